"""The Cython extension and its pure-Python twin place files the same way."""

import errno
import os
import subprocess
import sys

import pytest

from mkiso import fastcopy

try:
    from mkiso import _fastcopy
except ImportError:  # the suite insists on it below; this keeps collection going
    _fastcopy = None

IMPLEMENTATIONS = {
    "cython": (getattr(_fastcopy, "link_or_copy", None), getattr(_fastcopy, "place_files", None)),
    "python": (fastcopy.py_link_or_copy, fastcopy.py_place_files),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    link_or_copy, place_files = IMPLEMENTATIONS[request.param]
    if link_or_copy is None:
        pytest.fail("the Cython extension mkiso._fastcopy is not built")
    return link_or_copy, place_files


@pytest.fixture
def other_fs(tmp_path):
    """A folder on another file system than tmp_path (tmpfs), so links fail with EXDEV."""
    base = "/dev/shm"
    if not os.path.isdir(base) or os.stat(base).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    folder = os.path.join(base, "mkiso-test-%d" % os.getpid())
    os.makedirs(folder)
    yield folder
    subprocess.run(["rm", "-rf", folder], check=True)


def make_file(path, size):
    data = os.urandom(size)
    with open(path, "wb") as handle:
        handle.write(data)
    return data


def test_same_file_system_is_a_hard_link(impl, tmp_path):
    link_or_copy, _ = impl
    make_file(tmp_path / "a", 1000)
    assert link_or_copy(str(tmp_path / "a"), str(tmp_path / "b")) == "link"
    assert os.stat(tmp_path / "a").st_ino == os.stat(tmp_path / "b").st_ino


@pytest.mark.parametrize("size", [0, 1, 65536 + 7, 3 * 1024 * 1024 + 11])
def test_other_file_system_is_a_copy(impl, tmp_path, other_fs, size):
    link_or_copy, _ = impl
    data = make_file(tmp_path / "a", size)
    target = os.path.join(other_fs, "b")
    assert link_or_copy(str(tmp_path / "a"), target) == "copy"
    with open(target, "rb") as handle:
        assert handle.read() == data


def test_existing_target_is_never_overwritten(impl, tmp_path, other_fs):
    link_or_copy, _ = impl
    make_file(tmp_path / "a", 10)
    for target in (str(tmp_path / "b"), os.path.join(other_fs, "b")):
        with open(target, "wb") as handle:
            handle.write(b"keep me")
        with pytest.raises(FileExistsError) as caught:
            link_or_copy(str(tmp_path / "a"), target)
        assert caught.value.filename2 == target
        with open(target, "rb") as handle:
            assert handle.read() == b"keep me"


def test_missing_source_names_it(impl, tmp_path):
    link_or_copy, _ = impl
    with pytest.raises(FileNotFoundError) as caught:
        link_or_copy(str(tmp_path / "absent"), str(tmp_path / "b"))
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(tmp_path / "absent")
    assert not os.path.exists(tmp_path / "b")


def test_missing_source_across_file_systems(impl, tmp_path, other_fs):
    link_or_copy, _ = impl
    with pytest.raises(FileNotFoundError):
        link_or_copy(str(tmp_path / "absent"), os.path.join(other_fs, "b"))


def test_place_files_counts_links_and_copies(impl, tmp_path, other_fs):
    _, place_files = impl
    pairs, contents = [], {}
    for index in range(20):
        source = str(tmp_path / ("src%d" % index))
        contents[source] = make_file(source, 100 + index)
        target = os.path.join(other_fs if index % 4 == 0 else str(tmp_path), "dst%d" % index)
        pairs.append((source, target))
    assert place_files(pairs) == (15, 5)
    for source, target in pairs:
        with open(target, "rb") as handle:
            assert handle.read() == contents[source]


def test_place_files_stops_at_the_first_failure(impl, tmp_path):
    _, place_files = impl
    make_file(tmp_path / "a", 5)
    pairs = [(str(tmp_path / "a"), str(tmp_path / "b")),
             (str(tmp_path / "missing"), str(tmp_path / "c")),
             (str(tmp_path / "a"), str(tmp_path / "d"))]
    with pytest.raises(FileNotFoundError) as caught:
        place_files(pairs)
    assert caught.value.filename == str(tmp_path / "missing")
    assert os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "d")


def test_place_files_accepts_bytes_and_empty(impl, tmp_path):
    _, place_files = impl
    make_file(tmp_path / "a", 5)
    assert place_files([]) == (0, 0)
    assert place_files([(os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b"))]) == (1, 0)


def test_extension_is_used_unless_disabled():
    code = "from mkiso import fastcopy; print(fastcopy.IMPLEMENTATION)"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, MKISO_NO_CEXT="1"))
    assert default.stdout.strip() == "cython"
    assert forced.stdout.strip() == "python"
