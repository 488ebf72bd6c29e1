"""The disc's web content in a real browser: Debian's chromium, headless, opening the extracted disc."""

import os

from test_desk_page import browser  # noqa: F401 (fixture; the module skips without selenium)
from test_web_content import PRIVACY, get_disc


def test_the_disc_opens_in_a_browser(browser, make_service, wsgi_call, archive, tmp_path):  # noqa: F811
    """Headless chromium opens INDEX.HTM from the extracted disc, follows a study link, shows its previews."""
    from selenium.webdriver.common.by import By
    disc, _ = get_disc(wsgi_call, make_service(), tmp_path, "accession_numbers=MR.180505.026,ACC1002",
                       "/api/iso/download-multiple")
    browser.get("file://" + os.path.join(disc.root, "INDEX.HTM"))
    body = browser.find_element(By.TAG_NAME, "body").text
    for words in ("Patient: Müller, Jürgen", "MR sample study", "MR.180505.026", "CT sample study", "ACC1002",
                  PRIVACY):
        assert words in body, words
    for modality, accession in (("MR", "MR.180505.026"), ("CT", "ACC1002")):
        browser.get("file://" + os.path.join(disc.root, "INDEX.HTM"))
        browser.find_element(By.LINK_TEXT, "%s sample study" % modality).click()
        assert "/IHE_PDI/STU0000" in browser.current_url
        assert accession in browser.find_element(By.TAG_NAME, "body").text
        images = browser.find_elements(By.TAG_NAME, "img")
        assert images and all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                     image) == 8 for image in images)
    assert browser.execute_script("return document.scripts.length") == 0
