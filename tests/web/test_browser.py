"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium) against a
stack under supervisord (the controller and the real DHCP service, serving no interface): the fleet page lists
a booted PC with its state and picks up a new one live, the PC page draws its waterfall, a scale confirmed on
the services page is what `bootfleet --json status` then reports. Screenshots of each page go to
var/test-artifacts/web/."""

import time

import pytest

from browser_support import chromium, shot
from support import wait_for
from web_support import MAC, WebStack, booted_pc


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path) as driver:
        yield driver


@pytest.mark.integration
def test_dashboard_in_a_real_browser(procs, tmp_path, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    stack = WebStack(procs, tmp_path, {"scale": {"dhcp": 1, "tftp": 0, "iscsi_target": 0}}, supervised=True)
    wait_for(lambda: len([p for p in stack.cli_json("status")["processes"] if p["service"] == "dhcp" and p.get("health") == "ok"]) == 1,
             timeout=60, interval=0.3, what="dhcp[0] up under supervisord")
    stack.boot_pc()
    wait = WebDriverWait(browser, 30)

    # log in with the token from the state directory
    browser.get(stack.url + "/login")
    browser.find_element(By.ID, "secret").send_keys(stack.token)
    browser.find_element(By.ID, "login").click()
    wait.until(EC.url_to_be(stack.url + "/"))

    # the fleet: the booted PC with its state, then a second PC shows up live, without a reload
    row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'#fleet tr[data-mac="{MAC}"]')))
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "pc1" and cells[1] == MAC and cells[2] == "running" and cells[3] == "10.77.0.100", cells
    wait.until(EC.text_to_be_present_in_element((By.ID, "live"), "live"))
    browser.execute_script("window.notReloaded = true")
    now = time.time()
    stack.feeder.events([(now, "dhcp.discover", {"mac": "52:54:00:00:00:02"})])
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#fleet tr[data-mac="52:54:00:00:00:02"]')))
    assert browser.execute_script("return window.notReloaded") is True
    new_row = browser.find_element(By.CSS_SELECTOR, '#fleet tr[data-mac="52:54:00:00:00:02"]')
    cli_state = {c["mac"]: c["state"] for c in stack.cli_json("clients")["clients"]}["52:54:00:00:00:02"]
    assert new_row.find_elements(By.TAG_NAME, "td")[2].text == cli_state != "running"
    # sortable and filterable in the page
    browser.find_element(By.ID, "fleet-filter").send_keys("running")
    assert not browser.find_element(By.CSS_SELECTOR, '#fleet tr[data-mac="52:54:00:00:00:02"]').is_displayed()
    browser.find_element(By.ID, "fleet-filter").send_keys(Keys.CONTROL, "a", Keys.DELETE)
    assert browser.find_element(By.CSS_SELECTOR, '#fleet tr[data-mac="52:54:00:00:00:02"]').is_displayed()
    browser.find_element(By.CSS_SELECTOR, '#fleet th[data-col="10"]').click()  # by last boot: pc1 booted first
    macs = [tr.get_attribute("data-mac") for tr in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")]
    assert macs == [MAC, "52:54:00:00:00:02"], macs
    browser.find_element(By.CSS_SELECTOR, '#fleet th[data-col="10"]').click()  # again: newest first
    macs = [tr.get_attribute("data-mac") for tr in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")]
    assert macs == ["52:54:00:00:00:02", MAC], macs
    shot(browser, artifacts, "fleet")

    # one PC: its boot as a waterfall, DHCP → TFTP → iSCSI login → first READ → OS login, with durations
    browser.get(f"{stack.url}/pc/{MAC}")
    phases = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.waterfall g.phase"))
    assert [p.get_attribute("data-phase") for p in phases] == ["DHCP", "TFTP/HTTP", "iSCSI login", "first READ", "OS login"]
    assert [float(p.get_attribute("data-duration")) for p in phases] == [0.4, 0.7, 0.4, 0.1, 2.3]
    bars = [p.find_element(By.TAG_NAME, "rect") for p in phases]
    assert all(b.size["width"] > 0 for b in bars) and bars[4].size["width"] > bars[0].size["width"]
    assert "iscsi.first_read" in browser.find_element(By.CSS_SELECTOR, "table.events").text
    shot(browser, artifacts, "pc")

    # services: scale dhcp to 2 through the confirmation dialog; the CLI then reports 2 processes
    browser.get(stack.url + "/services")
    browser.find_element(By.CSS_SELECTOR, '#scale tr[data-service="dhcp"] button[data-command="service-scale"]').click()
    dialog = wait.until(EC.visibility_of_element_located((By.ID, "confirm")))
    assert "dhcp" in dialog.text
    count = browser.find_element(By.ID, "confirm-input")
    count.clear()
    count.send_keys("2")
    shot(browser, artifacts, "services-confirm")
    browser.find_element(By.ID, "confirm-ok").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "flash"), "dhcp: 2 processes"))

    def two_dhcp():
        rows = [p for p in stack.cli_json("status")["processes"] if p["service"] == "dhcp" and p.get("state") == "RUNNING"]
        return len(rows) == 2 and all(p.get("health") == "ok" for p in rows)

    wait_for(two_dhcp, timeout=60, interval=0.5, what="2 dhcp processes in bootfleet status")
    assert stack.cli_json("config", "get", "scale.dhcp")["value"] == 2
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#processes tr[data-service="dhcp"]')) == 2)
    shot(browser, artifacts, "services")

    # a cancelled dialog does nothing
    browser.find_element(By.CSS_SELECTOR, '#scale tr[data-service="dhcp"] button[data-command="service-restart"]').click()
    wait.until(EC.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-cancel").click()
    assert stack.cli_json("config", "get", "scale.dhcp")["value"] == 2

    # events, filtered by type
    browser.get(stack.url + "/events?type=iscsi")
    types = {tr.get_attribute("data-type") for tr in browser.find_elements(By.CSS_SELECTOR, "table.events tbody tr")}
    assert types == {"iscsi.login", "iscsi.first_read", "iscsi.io_stats"}, types
    shot(browser, artifacts, "events")

    # images: none in this stack
    browser.get(stack.url + "/images")
    assert "no images" in browser.find_element(By.ID, "main").text
    shot(browser, artifacts, "images")
    # a PC action the controller refuses shows the controller's own answer (pc1 is on no image)
    browser.get(f"{stack.url}/pc/{MAC}")
    browser.find_element(By.CSS_SELECTOR, 'button[data-command="client-reset"]').click()
    wait.until(EC.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait.until(lambda d: "client-reset" in d.find_element(By.ID, "flash").text and "…" not in d.find_element(By.ID, "flash").text)
    assert "error" in browser.find_element(By.ID, "flash").get_attribute("class")

    # an image: created and assigned over the API; the images page lists it with its PC, the fleet its columns
    auth = {"Authorization": f"Bearer {stack.token}"}
    assert stack.post("/api/image-create", {"name": "lab", "size": "1M"}, auth)[1]["result"] == 0
    assert stack.post("/api/client-assign", {"mac": MAC, "image": "lab", "mode": "persistent"}, auth)[1]["result"] == 0
    browser.get(stack.url + "/images")
    assert "1 (current)" in wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "table.versions"))).text
    browser.find_element(By.CSS_SELECTOR, 'button[data-command="image-publish"]').click()
    wait.until(EC.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait.until(lambda d: "publish" in d.find_element(By.ID, "flash").text and "…" not in d.find_element(By.ID, "flash").text)
    shot(browser, artifacts, "images-lab")
    browser.get(stack.url + "/")
    row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'#fleet tr[data-mac="{MAC}"]')))
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    cli = next(c for c in stack.cli_json("clients")["clients"] if c["mac"] == MAC)
    assert (cells[4], cells[6]) == (cli["image"], cli["mode"]) == ("lab", "persistent"), cells
    shot(browser, artifacts, "fleet-lab")
