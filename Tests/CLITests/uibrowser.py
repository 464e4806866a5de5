#!/usr/bin/env python3
"""The browser flows of the `cabackup ui` tests: Debian's headless Chromium driven with
Selenium, getting in as a user does (by opening the 0600 access file, which sends the
browser to /login with the token). UIBrowserTests.swift starts `cabackup ui` and checks what
the flow leaves behind (downloads, restores) with the independent reader.

  uibrowser.py mouse    --access FILE --downloads DIR --repo DIR --source DIR --change FILE
                        --file FILE --folder DIR --target DIR
  uibrowser.py keyboard --access FILE --downloads DIR --file FILE
  uibrowser.py narrow   --access FILE --folder DIR
  uibrowser.py space    --access FILE --server URL --source DIR --quota TEXT

mouse: adds a new repository through the page's form (created with a password), locks and
unlocks it, syncs with Sync now, changes --change, waits for the page to show the change
(the schedule's banner, and one browser notification while the tab is hidden), syncs
again, finds the new snapshot in the timeline, browses to --file and downloads it into
--downloads, restores --file below --target/file and --folder below --target/folder.
keyboard: the same essentials with keys only (Tab, Shift+Tab, Enter, Space, typing) on the
configured repository: unlock, sync, find the snapshot, download --file; every focused
control must show a focus outline, and a Tab round must reach every visible control.
space: registers the account 'alice' on --server with the page's form, adds the space it
fills in (created), and syncs --source into it; the storage chart names the quota (--quota,
as the page writes it); a second login with the form lists two devices, and the other one
is revoked with its button (after the confirmation).
narrow: at a 375x667 window, every main view must have no horizontal scrolling.

Prints one line per step; exits 1 with the reason (and the page's text) when a step fails.
"""
import argparse
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

PASSWORD = "correct horse battery staple"
STEP_TIMEOUT = 60


class FlowFailed(Exception):
    url = ""
    page = ""


def browser(downloads, narrow=False):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--allow-file-access-from-files"]:
        options.add_argument(argument)
    if downloads:
        options.add_experimental_option("prefs", {
            "download.default_directory": downloads, "download.prompt_for_download": False,
            "download.directory_upgrade": True, "safebrowsing.enabled": False})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    if downloads:
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
    if narrow:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 375, "height": 667, "deviceScaleFactor": 1, "mobile": False})
    return driver


def step(text):
    print("step: " + text, flush=True)


def wait(driver, what, predicate, timeout=STEP_TIMEOUT):
    """Polls predicate(driver) until it returns something true; fails naming `what`."""
    deadline = time.time() + timeout
    while True:
        try:
            value = predicate(driver)
            if value:
                return value
        except WebDriverException:
            pass
        if time.time() > deadline:
            failure = FlowFailed("timed out waiting for " + what)
            failure.url = driver.current_url
            failure.page = driver.find_element(By.TAG_NAME, "body").text[:3000]
            raise failure
        time.sleep(0.1)


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def login(driver, access):
    """Opens the access file as a user does; it redirects with the token to the page."""
    driver.get("file://" + access)
    wait(driver, "the page after the access file's redirect",
         lambda d: d.current_url.endswith("/") and d.find_elements(By.ID, "repository-list"))
    step("logged in through the access file: " + driver.current_url)


def button(driver, label, within=None):
    """The visible button (or link) whose text is `label`."""
    scope = driver.find_element(By.CSS_SELECTOR, within) if within else driver
    for candidate in scope.find_elements(By.CSS_SELECTOR, "button, a, summary"):
        if candidate.is_displayed() and candidate.text.strip() == label:
            return candidate
    return None


def click(driver, label, within=None):
    """Clicks the button (found again when the page replaced it meanwhile)."""
    def found_and_clicked(d):
        b = button(d, label, within)
        if b:
            b.click()
            return True
    wait(driver, "a button '%s'" % label, found_and_clicked)


def tree_row(driver, name):
    """The row of the tree table whose first cell is `name` (a folder's ends in '/')."""
    for row in driver.find_elements(By.CSS_SELECTOR, "#tree tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text.strip() == name:
            return row
    return None


def job_done(driver, kind, previous=""):
    """The job's status line once the job is done (and it is not `previous`, the last job's)."""
    status = text(driver, "job-status")
    if status == previous:
        return None
    if " failed" in status:
        raise FlowFailed("the %s failed: %s" % (kind, status))
    return status if status.startswith(kind + " done") else None


def downloaded(directory, name):
    path = os.path.join(directory, name)
    partial = [n for n in os.listdir(directory) if n.endswith(".crdownload")]
    return path if os.path.exists(path) and not partial else None


def mouse(a):
    driver = browser(a.downloads)
    try:
        login(driver, a.access)
        click(driver, "Add a repository")
        form = driver.find_element(By.ID, "add-form")
        form.find_element(By.NAME, "name").send_keys("home")
        form.find_element(By.NAME, "repo").send_keys(a.repo)
        form.find_element(By.NAME, "paths").send_keys(a.source)
        form.find_element(By.NAME, "every").send_keys("1s")
        form.find_element(By.NAME, "init").click()
        form.find_element(By.NAME, "password").send_keys(PASSWORD)
        click(driver, "Add", "#add-form")
        wait(driver, "the new repository's view", lambda d: text(d, "repository-title") == "home")
        step("added and created the repository " + a.repo)
        click(driver, "Lock")
        unlock = wait(driver, "the unlock form", lambda d: d.find_element(By.ID, "unlock-form").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#unlock-form input[name=password]").send_keys(PASSWORD)
        click(driver, "Unlock", "#unlock-form")
        wait(driver, "the unlocked view", lambda d: d.find_element(By.ID, "sync").is_displayed())
        step("locked and unlocked it with the password" if unlock else "")
        click(driver, "Sync now")
        status = wait(driver, "the first sync to complete in the page", lambda d: job_done(d, "sync"))
        wait(driver, "the first snapshot in the timeline",
             lambda d: len(d.find_elements(By.CSS_SELECTOR, "#snapshots li")) == 1)
        step("first sync: " + status)
        # The tab is hidden and notifications are allowed: a stand-in for the browser's
        # Notification records what the page shows (headless Chromium shows none).
        driver.execute_script("""
            window.shown = [];
            window.Notification = class { constructor(title, o) { window.shown.push(title + ": " + o.body); }
              static get permission() { return "granted"; } };
            Object.defineProperty(document, "hidden", { configurable: true, get: () => true });""")
        with open(a.change, "ab") as f:
            f.write(b" and a change made after the first snapshot\n")
        banner = wait(driver, "the page to show the change (the schedule's check): a banner with 1 modified",
                      lambda d: d.find_element(By.ID, "banner").is_displayed() and "1 modified" in text(d, "banner")
                      and text(d, "banner"))
        changes = text(driver, "changes")
        if ("M " + a.change) not in changes:
            raise FlowFailed("the change list lacks %s: %s" % (a.change, changes))
        step("the page shows the change: " + banner.replace("\n", " "))
        time.sleep(2.5)  # more scheduled checks of the same change set: still one notification
        shown = driver.execute_script("return window.shown")
        if len(shown) != 1 or not shown[0].startswith("cabackup: changes to back up: home: ") or "1 modified" not in shown[0]:
            raise FlowFailed("the hidden tab did not show one notification of the change: %s" % shown)
        driver.execute_script("delete document.hidden")
        step("the hidden tab showed one notification: " + shown[0])
        click(driver, "Sync now", "#banner")
        status = wait(driver, "the second sync to complete in the page", lambda d: job_done(d, "sync", status))
        short = status.rsplit("snapshot ", 1)[-1].strip()
        newest = wait(driver, "the new snapshot at the top of the timeline",
                      lambda d: len(d.find_elements(By.CSS_SELECTOR, "#snapshots li")) == 2
                      and d.find_element(By.CSS_SELECTOR, "#snapshots li").text)
        if short not in newest or "1 files new or changed" not in newest:
            raise FlowFailed("the timeline's newest entry is not the new snapshot %s: %s" % (short, newest))
        step("second sync, the timeline's newest: " + newest)
        click(driver, newest.strip(), "#snapshots")
        wait(driver, "the new snapshot's tree", lambda d: text(d, "tree-path").startswith(short + ":/"))
        for part in os.path.dirname(a.file).strip("/").split("/"):
            wait(driver, "the folder " + part, lambda d: tree_row(d, part + "/"))
            click(driver, part + "/", "#tree")
        name = os.path.basename(a.file)
        row = wait(driver, "the file " + name, lambda d: tree_row(d, name))
        step("browsed to " + text(driver, "tree-path"))
        row.find_element(By.LINK_TEXT, "download").click()
        wait(driver, "the download of " + name, lambda d: downloaded(a.downloads, name))
        step("downloaded " + name)
        # Restore the file (the "restores one file") into TARGET/file, then the folder
        # into TARGET/folder.
        driver.find_element(By.ID, "restore-target").send_keys(a.target + "/file")
        row.find_element(By.XPATH, ".//button[text()='restore']").click()
        status = wait(driver, "the file's restore to complete in the page", lambda d: job_done(d, "restore", status))
        step("restored %s: %s" % (name, status))
        driver.find_element(By.ID, "restore-target").clear()
        driver.find_element(By.ID, "restore-target").send_keys(a.target + "/folder")
        parent = os.path.dirname(a.folder)
        for _ in range(20):
            shown = wait(driver, "the tree's path", lambda d: text(d, "tree-path"))
            if shown.endswith(":" + parent):
                break
            click(driver, "..", "#tree")
            wait(driver, "the folder above " + shown, lambda d: text(d, "tree-path") != shown)
        folder = os.path.basename(a.folder)
        wait(driver, "the restore button of " + folder, lambda d: tree_row(d, folder + "/").find_element(
            By.XPATH, ".//button[text()='restore']").click() or True)
        wait(driver, "the restore to complete in the page", lambda d: job_done(d, "restore", status))
        message = wait(driver, "the restore's message", lambda d: "Restored" in text(d, "message") and text(d, "message"))
        step(message)
    finally:
        driver.quit()


def focused(driver):
    """The focused element's tag, id, text and whether it shows a focus outline."""
    return driver.execute_script("""
        const e = document.activeElement; const s = getComputedStyle(e);
        return {tag: e.tagName.toLowerCase(), id: e.id, name: e.getAttribute("name") || "",
                text: (e.textContent || "").trim(), type: e.getAttribute("type") || "",
                outline: s.outlineStyle !== "none" && parseFloat(s.outlineWidth) >= 2};""")


def tab_to(driver, what, matches, backwards=False, limit=80):
    """Presses Tab (or Shift+Tab) until the focused element matches (none when it does
    already); every element that Tab gives the focus must show it."""
    if matches(focused(driver)):
        return focused(driver)
    actions = webdriver.ActionChains(driver)
    for _ in range(limit):
        if backwards:
            actions.key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        else:
            actions.send_keys(Keys.TAB).perform()
        f = focused(driver)
        if f["tag"] != "body" and not f["outline"]:
            raise FlowFailed("no visible focus on %s" % f)
        if matches(f):
            return f
    raise FlowFailed("Tab never reached " + what)


def every_control_reachable(driver, view):
    """Tabs once around the whole page: every visible control (button, link, field,
    summary) must get the focus, with a visible outline."""
    controls = driver.execute_script("""
        const all = [...document.querySelectorAll("button, a[href], input, textarea, select, summary")]
          .filter(e => e.checkVisibility({visibilityProperty: true}) && !e.disabled);
        all.forEach((e, i) => e.dataset.control = i);
        return all.length;""")
    driver.execute_script("document.activeElement.blur(); window.focus()")
    seen = set()
    actions = webdriver.ActionChains(driver)
    for _ in range(controls + 20):
        actions.send_keys(Keys.TAB).perform()
        f = focused(driver)
        key = driver.execute_script("return document.activeElement.dataset.control")
        if key is None:
            continue
        if key in seen:
            break
        if not f["outline"]:
            raise FlowFailed("no visible focus on %s" % f)
        seen.add(key)
    if len(seen) != controls:
        missing = driver.execute_script("""
            return [...document.querySelectorAll("[data-control]")].filter(e => !arguments[0].includes(e.dataset.control))
              .map(e => e.outerHTML.slice(0, 120));""", list(seen))
        raise FlowFailed("%s: Tab reached %d of %d controls; not: %s" % (view, len(seen), controls, missing))
    step("%s: Tab reaches all %d controls, each with a focus outline" % (view, controls))


def keys(driver, *sequence):
    webdriver.ActionChains(driver).send_keys(*sequence).perform()


def keyboard(a):
    driver = browser(a.downloads)
    try:
        login(driver, a.access)
        keys(driver, Keys.TAB)
        every_control_reachable(driver, "the repository list")
        tab_to(driver, "Add a repository", lambda f: f["tag"] == "summary")
        keys(driver, Keys.ENTER)
        every_control_reachable(driver, "the add form")
        tab_to(driver, "Add a repository", lambda f: f["tag"] == "summary")
        keys(driver, Keys.ENTER)
        tab_to(driver, "the repository 'home'", lambda f: f["tag"] == "button" and f["text"].startswith("home"))
        keys(driver, Keys.ENTER)
        wait(driver, "the repository's view", lambda d: text(d, "repository-title") == "home")
        tab_to(driver, "the password field", lambda f: f["name"] == "password" and f["type"] == "password")
        keys(driver, PASSWORD, Keys.ENTER)
        wait(driver, "the unlocked view", lambda d: d.find_element(By.ID, "sync").is_displayed())
        step("unlocked with the keyboard")
        tab_to(driver, "Sync now", lambda f: f["id"] == "sync")
        keys(driver, Keys.SPACE)
        status = wait(driver, "the sync to complete in the page", lambda d: job_done(d, "sync"))
        short = status.rsplit("snapshot ", 1)[-1].strip()
        step("synced with the keyboard: " + status)
        wait(driver, "the snapshot in the timeline",
             lambda d: any(short in li.text for li in d.find_elements(By.CSS_SELECTOR, "#snapshots li")))
        tab_to(driver, "the snapshot " + short, lambda f: f["tag"] == "button" and short in f["text"])
        keys(driver, Keys.ENTER)
        wait(driver, "the snapshot's tree", lambda d: text(d, "tree-path").startswith(short + ":/"))
        step("found the snapshot " + short)
        for part in os.path.dirname(a.file).strip("/").split("/"):
            wait(driver, "the folder " + part, lambda d: tree_row(d, part + "/"))
            tab_to(driver, "the folder " + part, lambda f: f["tag"] == "button" and f["text"] == part + "/")
            keys(driver, Keys.ENTER)
        name = os.path.basename(a.file)
        wait(driver, "the file " + name, lambda d: tree_row(d, name))
        # The download link of the file's row: its name cell is the one before it.
        tab_to(driver, "the download of " + name, lambda f: f["tag"] == "a" and driver.execute_script(
            "return document.activeElement.closest('tr').cells[0].textContent.trim()") == name)
        keys(driver, Keys.ENTER)
        wait(driver, "the download of " + name, lambda d: downloaded(a.downloads, name))
        step("downloaded %s with the keyboard" % name)
        every_control_reachable(driver, "the unlocked repository")
    finally:
        driver.quit()


def no_horizontal_scroll(driver, view):
    widths = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    if widths[1] != 375 or widths[0] > widths[1]:
        wide = driver.execute_script("""
            return [...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > innerWidth)
              .slice(0, 5).map(e => e.tagName + "#" + e.id + "." + e.className + " " + e.getBoundingClientRect().right);""")
        raise FlowFailed("%s scrolls horizontally at 375 px: scrollWidth %d > %d (%s)" % (view, widths[0], widths[1], wide))
    step("%s: scrollWidth %d <= %d" % (view, widths[0], widths[1]))


def narrow(a):
    driver = browser(None, narrow=True)
    try:
        login(driver, a.access)
        no_horizontal_scroll(driver, "the repository list")
        click(driver, "Add a repository")
        wait(driver, "the add form", lambda d: d.find_element(By.ID, "add-form").is_displayed())
        no_horizontal_scroll(driver, "the add form")
        click(driver, "Add a repository")
        click(driver, "Log in to a server space")
        wait(driver, "the account form", lambda d: d.find_element(By.ID, "account-form").is_displayed())
        no_horizontal_scroll(driver, "the server space form")
        click(driver, "Log in to a server space")
        click(driver, wait(driver, "the repository", lambda d: [b.text for b in d.find_elements(
            By.CSS_SELECTOR, "#repository-list button")])[0])
        wait(driver, "the unlock form", lambda d: d.find_element(By.ID, "unlock-form").is_displayed())
        no_horizontal_scroll(driver, "the locked repository")
        driver.find_element(By.CSS_SELECTOR, "#unlock-form input[name=password]").send_keys(PASSWORD)
        click(driver, "Unlock", "#unlock-form")
        wait(driver, "the changes", lambda d: "to sync" in text(d, "changes-summary"))
        no_horizontal_scroll(driver, "the changes")
        click(driver, "Sync now")
        wait(driver, "the sync to complete in the page", lambda d: job_done(d, "sync"))
        wait(driver, "the snapshot's tree", lambda d: tree_row(d, a.folder.strip("/").split("/")[0] + "/"))
        no_horizontal_scroll(driver, "the timeline and the tree's root")
        for part in a.folder.strip("/").split("/"):
            wait(driver, "the folder " + part, lambda d: tree_row(d, part + "/"))
            click(driver, part + "/", "#tree")
        wait(driver, "the folder's entries", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tree tbody tr")) > 1)
        no_horizontal_scroll(driver, "a deep folder of the tree")
        driver.find_element(By.CSS_SELECTOR, "#find-form input[name=pattern]").send_keys("*", Keys.ENTER)
        wait(driver, "the search's results", lambda d: d.find_elements(By.CSS_SELECTOR, "#found li"))
        no_horizontal_scroll(driver, "the search's results")
    finally:
        driver.quit()


def space(a):
    driver = browser(None)
    try:
        login(driver, a.access)
        click(driver, "Log in to a server space")
        form = driver.find_element(By.ID, "account-form")
        form.find_element(By.NAME, "server").send_keys(a.server)
        form.find_element(By.NAME, "user").send_keys("alice")
        form.find_element(By.NAME, "register").click()
        form.find_element(By.NAME, "email").send_keys("alice@example.org")
        form.find_element(By.NAME, "password").send_keys("alice account password")
        click(driver, "Log in", "#account-form")
        message = wait(driver, "the login's message", lambda d: "logged in as alice" in text(d, "message").lower()
                       and text(d, "message"))
        step(message)
        add = driver.find_element(By.ID, "add-form")
        location = add.find_element(By.NAME, "repo").get_attribute("value")
        if "://alice@" not in location:
            raise FlowFailed("the add form's location is not the space's: " + location)
        add.find_element(By.NAME, "name").send_keys("space")
        add.find_element(By.NAME, "paths").send_keys(a.source)
        add.find_element(By.NAME, "init").click()
        add.find_element(By.NAME, "password").send_keys(PASSWORD)
        click(driver, "Add", "#add-form")
        wait(driver, "the space's view", lambda d: text(d, "repository-title") == "space")
        step("added the space " + location)
        click(driver, "Sync now")
        step("synced into the space: " + wait(driver, "the sync", lambda d: job_done(d, "sync")))
        # Storage against the quota (the test's server has one): the bar's used part grew.
        usage = wait(driver, "the usage against the quota",
                     lambda d: " of " in text(d, "usage-text") and "used" in text(d, "usage-text")
                     and float(d.find_element(By.ID, "usage-used").get_attribute("width")) > 0
                     and text(d, "usage-text"))
        if a.quota not in usage:
            raise FlowFailed("the usage does not name the quota %s: %s" % (a.quota, usage))
        step("usage chart: " + usage)
        # Log in to the space a second time with the form: the first login becomes another
        # device in the list, which is revoked (after the confirmation) from the page.
        click(driver, "Log in to a server space")
        form = driver.find_element(By.ID, "account-form")
        form.find_element(By.NAME, "server").send_keys(a.server)
        form.find_element(By.NAME, "user").send_keys("alice")
        form.find_element(By.NAME, "password").send_keys("alice account password")
        click(driver, "Log in", "#account-form")
        wait(driver, "the second login", lambda d: text(d, "message").startswith("Logged in as alice"))
        click(driver, "space — " + location)
        rows = lambda d: d.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
        wait(driver, "two devices listed", lambda d: len(rows(d)) == 2)
        other = [r for r in rows(driver) if "(this device)" not in r.text]
        if len(other) != 1 or "full" not in other[0].text:
            raise FlowFailed("the devices list is not this device and one other: %s" % [r.text for r in rows(driver)])
        step("devices: " + " | ".join(r.text.replace("\n", " ") for r in rows(driver)))
        other[0].find_element(By.TAG_NAME, "button").click()
        alert = wait(driver, "the revoke confirmation", lambda d: d.switch_to.alert)
        step("confirm: " + alert.text)
        alert.accept()
        wait(driver, "the revoked device gone", lambda d: len(rows(d)) == 1 and "(this device)" in rows(d)[0].text
             and "Revoked" in text(d, "message"))
        step(text(driver, "message"))
    finally:
        driver.quit()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("flow", choices=["mouse", "keyboard", "narrow", "space"])
    for option in ["access", "downloads", "repo", "source", "change", "file", "folder", "target", "server",
                   "quota"]:
        p.add_argument("--" + option)
    a = p.parse_args()
    started = time.time()
    try:
        {"mouse": mouse, "keyboard": keyboard, "narrow": narrow, "space": space}[a.flow](a)
    except FlowFailed as failure:
        print("FAILED: %s" % failure, flush=True)
        print("at %s, the page's text:\n%s" % (failure.url, failure.page), flush=True)
        sys.exit(1)
    print("ok: the %s flow in %.1f s" % (a.flow, time.time() - started), flush=True)


if __name__ == "__main__":
    main()
