"""The desk page in a real browser: Debian's chromium, headless, driven by selenium and chromedriver."""

import os
import re
import time
import zipfile

import pytest

from mkiso import demo
from mkiso.http import application
from discs import Disc, check_pdi, open_iso
from test_jobs import slow_receiver_tools
from test_pacs_setup import against, dcmqrscp  # noqa: F401 (a fixture)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is installed in the venv (requirements-dev)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium(tmp_path, *flags):
    """Headless chromium saving downloads to ``tmp_path``/downloads (``driver.downloads``), with ``flags``."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup installs them)")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,800", "--user-data-dir=%s" % (tmp_path / "profile")) + flags:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.downloads = downloads
    return driver


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())


def visible_text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def open_page(browser, live_server, service):
    base = live_server(application.Application(service.config, service))
    browser.get(base + "/")
    return base


def look_up(browser, accessions, paste=False):
    """Type the accessions (or paste them: lines at once, as from a worklist) and press Look up."""
    field = browser.find_element(By.ID, "accessions")
    field.clear()
    if paste:
        browser.execute_script("arguments[0].value = arguments[1]", field, accessions)
    else:
        field.send_keys(accessions)
    browser.find_element(By.ID, "lookup").click()


def test_paste_two_accessions_make_the_disc_and_download_it(browser, live_server, make_service, archive, tmp_path):
    service = make_service()
    open_page(browser, live_server, service)
    look_up(browser, "MR.180505.026\nACC1002\n", paste=True)
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 2)
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#studies tr")]
    assert all("Müller, Jürgen" in row and "PAT-1001" in row and "2024-01-15" in row for row in rows), rows
    assert "2 studies found, 7 images." in visible_text(browser, "message")
    browser.find_element(By.ID, "download").click()
    bar = browser.find_element(By.ID, "bar")
    wait(browser, lambda: bar.get_attribute("value") == "100")
    link = browser.find_element(By.ID, "iso-link")
    assert link.is_displayed() and "token=" in link.get_attribute("href")
    assert visible_text(browser, "status").startswith("The disc for Müller, Jürgen (MR.180505.026, ACC1002) is ready")
    browser.save_screenshot(str(tmp_path / "desk-ready.png"))
    assert "Müller" not in browser.current_url and "PAT-1001" not in link.get_attribute("href")
    link.click()
    wait(browser, lambda: [name for name in os.listdir(browser.downloads) if name.endswith(".iso")])
    [name] = [name for name in os.listdir(browser.downloads) if name.endswith(".iso")]
    assert name == "Müller_Jürgen.iso"  # the RFC 6266 filename* as the browser saves it
    disc = open_iso(str(browser.downloads / name), str(tmp_path / "downloaded"))
    check_pdi(disc, archive.sop_uids("MR.180505.026", "ACC1002"))
    assert os.path.getsize(tmp_path / "desk-ready.png") > 10000


def test_an_unknown_accession_is_a_sentence(browser, live_server, make_service):
    open_page(browser, live_server, make_service())
    look_up(browser, "NOPE99")
    wait(browser, lambda: "NOPE99" in visible_text(browser, "message"))
    message = visible_text(browser, "message")
    assert message == "The PACS has no study for accession number NOPE99."
    assert not browser.find_element(By.ID, "found").is_displayed()


def test_cancel_from_the_page(browser, live_server, make_service, tmp_path):
    service = make_service(tools={"dcmtk_dir": slow_receiver_tools(tmp_path)})
    open_page(browser, live_server, service)
    look_up(browser, "BIG01")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    browser.find_element(By.ID, "download").click()
    # "of N" where the PACS said how many: dcmqrscp answers the manifest beside its C-MOVE only after it
    wait(browser, lambda: re.match(r"Receiving images: [1-9]", visible_text(browser, "status")))
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda: visible_text(browser, "status") == "Cancelled. Nothing was kept.")
    [job] = service.jobs.recent()
    assert job.state.value == "cancelled"
    browser.save_screenshot(str(tmp_path / "desk-cancelled.png"))


def test_the_page_asks_for_the_key_and_keeps_it_for_the_tab_only(browser, live_server, make_service):
    key = "desk-key-0123456789"
    service = make_service(auth={"enabled": True, "keys": {"desk-1": key}})
    open_page(browser, live_server, service)
    look_up(browser, "ACC2001")
    wait(browser, lambda: browser.find_element(By.ID, "key-panel").is_displayed())
    assert visible_text(browser, "message") == "Please enter the desk key from IT first."
    assert browser.find_element(By.CSS_SELECTOR, "label[for=api-key]").text == "Desk key"
    browser.find_element(By.ID, "api-key").send_keys(key + "\n")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    assert browser.execute_script("return sessionStorage.getItem('mkiso-api-key')") == key
    assert browser.execute_script("return localStorage.length") == 0
    browser.find_element(By.ID, "download").click()
    wait(browser, lambda: browser.find_element(By.ID, "bar").get_attribute("value") == "100")
    with open(service.config.audit.path) as handle:
        assert '"caller": "desk-1"' in handle.read()


def test_keyboard_only(browser, live_server, make_service):
    """Type, Enter to look up, the focus moves on to the download button, Enter starts it."""
    from selenium.webdriver.common.keys import Keys
    open_page(browser, live_server, make_service())
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "accessions"
    active.send_keys("ACC2001" + Keys.ENTER)
    wait(browser, lambda: browser.switch_to.active_element.get_attribute("id") == "download")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda: browser.switch_to.active_element.get_attribute("id") == "iso-link")
    time.sleep(0.1)
    assert visible_text(browser, "status").startswith("The disc for DOE, JANE (ACC2001) is ready")


def test_a_request_too_big_for_one_disc_lists_every_disc(browser, live_server, make_service, tmp_path):
    """With a tiny test medium the patient's two studies need several discs: one link each."""
    from mkiso.disc import media
    service = make_service(iso={"media": "cd", "max_bytes": media.BASE + 10000, "headroom_bytes": 0,
                                "web_content": False})  # a medium so small that the pages would not fit
    open_page(browser, live_server, service)
    look_up(browser, "MR.180505.026, ACC1002")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 2)
    browser.find_element(By.ID, "download").click()
    wait(browser, lambda: browser.find_element(By.ID, "bar").get_attribute("value") == "100")
    [job] = service.jobs.recent()
    links = browser.find_elements(By.CSS_SELECTOR, "#disc-links a")
    assert len(job.discs) > 1 and len(links) == len(job.discs)
    assert [link.text.split(" (")[0] for link in links] == [
        "Disc %d of %d" % (n, len(job.discs)) for n in range(1, len(job.discs) + 1)]
    assert not browser.find_element(By.ID, "iso-link").is_displayed()
    assert browser.switch_to.active_element.text.startswith("Disc 1 of")
    browser.save_screenshot(str(tmp_path / "desk-discs.png"))


# -- never the wrong patient's disc (SPEC §9) ----------------------------------------------------------------


def page_html(browser):
    return browser.execute_script("return document.documentElement.outerHTML")


def hrefs(browser):
    return browser.execute_script("return Array.from(document.querySelectorAll('[href]'), e => e.getAttribute('href'))")


def make_disc(browser, accessions, rows):
    look_up(browser, accessions)
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == rows)
    browser.find_element(By.ID, "download").click()
    wait(browser, lambda: browser.find_element(By.ID, "iso-link").is_displayed())


def nothing_of(browser, job, name):
    """No trace of ``job`` (its id, its token) or of the patient ``name`` anywhere in the page."""
    html = page_html(browser)
    assert job.id not in html and job.token not in html and name not in html
    assert not any(job.id in href for href in hrefs(browser))


def test_a_new_lookup_never_leaves_the_previous_patients_disc(browser, live_server, make_service, tmp_path):
    service = make_service()
    open_page(browser, live_server, service)
    make_disc(browser, "ACC2001", 1)
    [first] = service.jobs.recent()
    assert visible_text(browser, "status").startswith("The disc for DOE, JANE (ACC2001) is ready")
    assert browser.find_element(By.ID, "iso-link").get_attribute("href").endswith(first.token)
    browser.save_screenshot(str(tmp_path / "desk-a-ready.png"))
    look_up(browser, "ACC3001")  # another patient
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    nothing_of(browser, first, "DOE")
    assert not browser.find_element(By.ID, "job").is_displayed() and visible_text(browser, "status") == ""
    assert "SMITH, JOHN" in visible_text(browser, "studies")
    browser.save_screenshot(str(tmp_path / "desk-b-looked-up.png"))
    browser.find_element(By.ID, "download").click()
    wait(browser, lambda: browser.find_element(By.ID, "iso-link").is_displayed())
    second = next(job for job in service.jobs.recent() if job is not first)
    assert visible_text(browser, "status").startswith("The disc for SMITH, JOHN (ACC3001) is ready")
    assert hrefs(browser) == ["/api/jobs/%s/iso?token=%s" % (second.id, second.token)]
    nothing_of(browser, first, "DOE")
    browser.save_screenshot(str(tmp_path / "desk-b-ready.png"))
    look_up(browser, "NOPE99")  # finds nothing: nothing of B either
    wait(browser, lambda: "NOPE99" in visible_text(browser, "message"))
    nothing_of(browser, second, "SMITH")
    assert browser.find_elements(By.CSS_SELECTOR, "#studies tr") == [] and hrefs(browser) == []
    assert not browser.find_element(By.ID, "found").is_displayed()
    browser.save_screenshot(str(tmp_path / "desk-nothing-found.png"))
    for name in ("desk-a-ready", "desk-b-looked-up", "desk-b-ready", "desk-nothing-found"):
        assert os.path.getsize(tmp_path / (name + ".png")) > 10000


def test_editing_the_accessions_takes_the_disc_off_the_page(browser, live_server, make_service):
    service = make_service()
    open_page(browser, live_server, service)
    make_disc(browser, "ACC2001", 1)
    [job] = service.jobs.recent()
    browser.find_element(By.ID, "accessions").send_keys(",ACC3001")
    nothing_of(browser, job, "DOE")
    assert hrefs(browser) == [] and visible_text(browser, "status") == ""


def test_lower_case_finds_nothing_and_says_why(browser, live_server, make_service, tmp_path):
    open_page(browser, live_server, make_service())
    look_up(browser, "acc2001")
    wait(browser, lambda: "acc2001" in visible_text(browser, "message"))
    assert visible_text(browser, "message") == (
        "The PACS has no study for accession number acc2001. Accession numbers are matched exactly, "
        "capital letters included: acc2001 is not ACC2001.")
    browser.save_screenshot(str(tmp_path / "desk-lower-case.png"))


@pytest.mark.parametrize("printing", [False, True])
def test_the_publisher_button_shows_only_when_printing_is_configured(browser, live_server, make_service,
                                                                     silent_listener, printing):
    publisher = {"host": "127.0.0.1", "port": silent_listener.getsockname()[1]} if printing else {"host": ""}
    open_page(browser, live_server, make_service(publisher=publisher))
    look_up(browser, "ACC2001")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    time.sleep(0.2)  # the page asked /api/desk at load; give a late answer its chance to show the button
    assert browser.find_element(By.ID, "download").is_displayed()
    assert browser.find_element(By.ID, "print").is_displayed() is printing


def test_a_clerk_downloads_the_disc_for_a_usb_stick(browser, live_server, make_service, archive, tmp_path):
    """The ZIP button beside the disc image's: the ready line says it is a ZIP, the link saves one the
    stdlib reads back, holding the disc (its DICOMDIR, the patient's images, SHA256.TXT)."""
    open_page(browser, live_server, make_service())
    look_up(browser, "ACC2001")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    button = browser.find_element(By.ID, "download-zip")
    wait(browser, button.is_displayed)
    assert button.text == "Download for a USB stick (ZIP)"
    button.click()
    link = browser.find_element(By.ID, "iso-link")
    wait(browser, link.is_displayed)
    assert visible_text(browser, "status").startswith(
        "The disc for DOE, JANE (ACC2001) is ready as a ZIP for a USB stick")
    assert link.text == "Download the ZIP for a USB stick" and "/zip?token=" in link.get_attribute("href")
    link.click()
    wait(browser, lambda: [name for name in os.listdir(browser.downloads) if name.endswith(".zip")])
    [name] = [name for name in os.listdir(browser.downloads) if name.endswith(".zip")]
    assert name == "ACC2001.zip"
    with zipfile.ZipFile(browser.downloads / name) as archive_file:
        assert archive_file.testzip() is None
        archive_file.extractall(tmp_path / "stick")
    check_pdi(Disc(str(tmp_path / "stick")), archive.sop_uids("ACC2001"))
    assert (tmp_path / "stick" / "SHA256.TXT").exists()


def test_the_zip_button_shows_only_when_zips_are_on(browser, live_server, make_service):
    open_page(browser, live_server, make_service(zip={"enabled": False}))
    look_up(browser, "ACC2001")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    time.sleep(0.2)  # the page asked /api/desk at load
    assert not browser.find_element(By.ID, "download-zip").is_displayed()


def test_the_modality_is_shown_though_the_pacs_gives_no_modalities_in_study(browser, live_server, make_service):
    open_page(browser, live_server, make_service())
    look_up(browser, "MR.180505.026, ACC1002")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 2)
    modality = {row.find_elements(By.TAG_NAME, "td")[5].text: row.find_elements(By.TAG_NAME, "td")[3].text
                for row in browser.find_elements(By.CSS_SELECTOR, "#studies tr")}
    assert modality == {"MR.180505.026": "MR", "ACC1002": "CT"}


# -- errors a clerk can act on ------------------------------------------------------------------------------


def folded(browser, element_id):
    """The sentence the clerk reads in ``element_id`` and the technical line folded beneath it, once opened
    as a clerk would: a click on "Details for IT" (hidden until then)."""
    element = browser.find_element(By.ID, element_id)
    technical = element.find_element(By.CSS_SELECTOR, "details p")
    assert not technical.is_displayed()
    sentence, summary = element.text.split("\n")
    assert summary == "Details for IT"
    element.find_element(By.TAG_NAME, "summary").click()
    wait(browser, technical.is_displayed)
    return sentence, technical.text


def test_a_pacs_that_does_not_answer_is_a_sentence_for_the_clerk(browser, live_server, make_service, settings,
                                                                 tmp_path):
    """Before, the clerk read "PACS ABPACS@127.0.0.1:...: failed: Association Request Failed: 0006:031c TCP
    Initialization Error: Connection refused."."""
    settings["pacs"]["port"] = demo.free_port()  # nothing listens there: the PACS is down
    open_page(browser, live_server, make_service())
    look_up(browser, "ACC2001")
    wait(browser, lambda: "Please call IT" in visible_text(browser, "message"))
    sentence, technical = folded(browser, "message")
    assert sentence == "The PACS did not answer. Please call IT and give them this code: pacs_failed."
    assert "0006:031c TCP Initialization Error: Connection refused" in technical and "(request " in technical
    browser.save_screenshot(str(tmp_path / "desk-pacs-down.png"))


def test_a_disc_the_pacs_cannot_send_names_the_code_for_it(
        browser, live_server, make_service, settings, dcmqrscp, tmp_path):  # noqa: F811
    against(settings, dcmqrscp({}))  # the PACS does not know CDRECORD: the lookup works, the disc cannot
    open_page(browser, live_server, make_service())
    look_up(browser, "DAY1")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#studies tr")) == 1)
    browser.find_element(By.ID, "download").click()
    wait(browser, lambda: "Please call IT" in visible_text(browser, "status"))
    sentence, technical = folded(browser, "status")
    assert sentence == ("The PACS could not send the images to this service. Please call IT and give them this code: "
                        "move_destination_unknown.")
    assert "register AE CDRECORD at" in technical
    browser.save_screenshot(str(tmp_path / "desk-move-refused.png"))
