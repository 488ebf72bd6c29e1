"""Free space and background removal on their own, without a service.

Every guard against a full disk reads ``free_bytes``; ``remove_soon`` must
give space back without making a download wait, and never fail a request.
"""

import os
import threading
import time
import types

import pytest

from mkiso import disk


def eventually(condition, timeout=10):
    """Whether ``condition()`` holds within ``timeout`` seconds (polled; a slow machine only waits longer)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def make_tree(root):
    """A staging tree: folders inside folders, files at each level."""
    (root / "study" / "series").mkdir(parents=True)
    for folder in (root, root / "study", root / "study" / "series"):
        for number in range(3):
            (folder / ("IM%d" % number)).write_bytes(b"\0" * 1024)
    return root


@pytest.fixture
def rmtree_calls(monkeypatch):
    """The removals the remover ran, each with the error it raised (None); the first to start waits for
    ``release``, so a test can see what happens meanwhile."""
    disk._remover.submit(lambda: None).result(60)  # removals other tests queued are done: only ours are seen
    started, calls = [], []
    release = threading.Event()
    real_rmtree = disk.shutil.rmtree

    def rmtree(path, **options):
        started.append(path)
        if len(started) == 1:
            release.wait(10)
        call = {"path": path, "error": None}
        try:
            real_rmtree(path, **options)
        except OSError as exc:
            call["error"] = exc
            raise
        finally:
            calls.append(call)

    monkeypatch.setattr(disk, "shutil", types.SimpleNamespace(rmtree=rmtree))
    yield types.SimpleNamespace(calls=calls, release=release)
    release.set()


@pytest.fixture
def statvfs_of(monkeypatch):
    """The paths ``os.statvfs`` was asked about and what it answered, while disk uses it."""
    seen = []
    real_statvfs = os.statvfs

    def statvfs(path):
        seen.append((path, real_statvfs(path)))
        return seen[-1][1]

    monkeypatch.setattr(disk.os, "statvfs", statvfs)
    return seen


def test_free_bytes_is_what_statvfs_gives_an_unprivileged_writer(tmp_path, statvfs_of):
    free = disk.free_bytes(str(tmp_path))
    [(path, answer)] = statvfs_of
    assert path == str(tmp_path)
    assert free == answer.f_bavail * answer.f_frsize


def test_free_bytes_counts_available_fragments_not_free_blocks(monkeypatch):
    """f_bfree includes root's reserve, which the service user cannot write; f_bsize is not the unit."""
    answer = types.SimpleNamespace(f_bsize=65536, f_frsize=4096, f_bfree=1000, f_bavail=600)
    monkeypatch.setattr(disk.os, "statvfs", lambda path: answer)
    assert disk.free_bytes("/anywhere") == 600 * 4096


def test_remove_soon_removes_the_tree_in_the_background(tmp_path, rmtree_calls):
    """The call returns while the tree is still there: the download need not wait for the removal."""
    tree = make_tree(tmp_path / "staging")
    assert disk.remove_soon(str(tree)) is None
    assert tree.exists() and rmtree_calls.calls == []  # the removal waits for release: it runs elsewhere
    rmtree_calls.release.set()
    assert eventually(lambda: rmtree_calls.calls)  # recorded once rmtree returned
    assert not tree.exists() and tmp_path.exists()
    assert [call["path"] for call in rmtree_calls.calls] == [str(tree)]


def test_trees_are_removed_one_after_another_in_order(tmp_path, rmtree_calls):
    trees = [make_tree(tmp_path / name) for name in ("first", "second", "third")]
    for tree in trees:
        disk.remove_soon(str(tree))
    rmtree_calls.release.set()
    assert eventually(lambda: len(rmtree_calls.calls) == 3)
    assert [call["path"] for call in rmtree_calls.calls] == [str(tree) for tree in trees]
    assert not any(tree.exists() for tree in trees)


def test_removing_what_is_not_there_raises_nothing(tmp_path, rmtree_calls):
    """A crash, or a second caller, may have removed it already: that is no error, not even in the remover."""
    rmtree_calls.release.set()
    disk.remove_soon(str(tmp_path / "gone"))
    assert eventually(lambda: rmtree_calls.calls)
    assert rmtree_calls.calls == [{"path": str(tmp_path / "gone"), "error": None}]
