#!/usr/bin/env python3
"""Browser side of tests/netns_webui.rs: drives the web UI in headless Chromium with Playwright.

Run by the Rust test inside a node's network namespace (so 127.0.0.1:8666 is that node's API and
the browser can reach nothing but the lab):

    ip netns exec NS python3 drive.py MODE '{"login": URL, ...}'

Protocol (stdout, one JSON object per line; everything else goes to stderr):
  {"step": "..."}                      progress, for the test's failure messages;
  {"need": "WHAT", ...}                the test must do WHAT (e.g. join a member through the CLI),
                                       then write one JSON line to our stdin; we wait for it;
  {"done": true, "ok": true, "results": {...}}     the mode's findings; exit status 0;
  {"done": true, "ok": false, "error": "...", "step": "...", "html": "...", "console": [...]}
                                       a check failed; exit status 1.

The page is found by its accessible names only (the Page contract in HELPERS.md: headings,
labels, button names, the "Members" table caption), as a person with a screen reader would.
Chromium is Debian's (/usr/bin/chromium), never a downloaded one, with its background traffic
(updates, sync, safe browsing lists) turned off.
"""

import json
import os
import re
import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("LANRAGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
]
# How long one wait for the page may take (the daemon publishes a snapshot every 500 ms).
WAIT_MS = 15_000
BASE = os.environ.get("LANRAGE_UI_BASE", "http://127.0.0.1:8666")

current_step = "start"


class Fail(Exception):
    """A check on the page failed."""


def emit(obj):
    print(json.dumps(obj), flush=True)


def step(name):
    global current_step
    current_step = name
    emit({"step": name})


def need(what, **kw):
    """Ask the test to do `what` and wait for its answer (one JSON line)."""
    emit({"need": what, **kw})
    line = sys.stdin.readline()
    if not line:
        raise Fail(f"the test closed our stdin while we waited for {what!r}")
    return json.loads(line)


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def poll(page, what, fn, timeout_ms=WAIT_MS, every_ms=50):
    """Call fn() until it returns something truthy; returns (value, elapsed ms)."""
    start = time.monotonic()
    last = None
    while True:
        try:
            last = fn()
        except Exception as e:  # a locator that is not there yet, a detached node
            last = e
        if last and not isinstance(last, Exception):
            return last, (time.monotonic() - start) * 1000
        if (time.monotonic() - start) * 1000 > timeout_ms:
            raise Fail(f"timed out after {timeout_ms} ms waiting for {what} (last: {last!r})")
        page.wait_for_timeout(every_ms)


# ---------------------------------------------------------------------------------------------
# The page, by accessible names
# ---------------------------------------------------------------------------------------------


def section(page, heading):
    """The section (or region) whose heading is `heading`."""
    h = page.get_by_role("heading", name=heading, exact=True)
    return page.locator("section, [role=region]").filter(has=h).last


def section_text(page, heading):
    return section(page, heading).inner_text()


def members_table(page):
    return page.get_by_role("table", name="Members")


# A table as {"headers": [...], "rows": [{header: cell text}]} (visible text, trimmed).
TABLE_JS = """t => {
  const text = (c) => (c.innerText || c.textContent || "").trim();
  const head = t.tHead && t.tHead.rows.length ? t.tHead.rows[0] : t.rows[0];
  const headers = head ? [...head.cells].map(text) : [];
  const body = t.tBodies.length ? [...t.tBodies].flatMap(b => [...b.rows]) : [...t.rows].slice(1);
  const rows = body.map(r => Object.fromEntries([...r.cells].map((c, i) => [headers[i] ?? String(i), text(c)])));
  return {headers, rows};
}"""


def members(page):
    """The Members table, or None when the page shows none."""
    t = members_table(page)
    if t.count() == 0:
        return None
    return t.first.evaluate(TABLE_JS)


def member_row(page, name):
    """The row whose Name cell is `name` (optionally followed by a marker like "(host)")."""
    m = members(page)
    if not m:
        return None
    for r in m["rows"]:
        cell = r.get("Name", "")
        if cell == name or re.fullmatch(re.escape(name) + r"\s*\(host\)", cell):
            return r
    return None


def no_party_shown(page):
    return members_table(page).count() == 0 and not page.get_by_role(
        "button", name="Leave party", exact=True
    ).is_visible()


def alerts_text(page):
    return " | ".join(
        t.strip() for t in page.get_by_role("alert").all_inner_texts() if t.strip()
    )


def log_in(page, url):
    step("log in through the one-time URL")
    resp = page.goto(url)
    check(resp is not None and resp.ok, f"login page answered {resp and resp.status}")
    check(
        page.url.rstrip("/") == BASE,
        f"after login the page is {page.url}, not {BASE}/ (the code must leave the address bar)",
    )
    for h in ["This node", "Party", "Parties nearby", "Join by id", "Create a party"]:
        check(
            page.get_by_role("heading", name=h, exact=True).count() == 1,
            f"no heading {h!r} (the page has: "
            f"{page.get_by_role('heading').all_inner_texts()})",
        )


def wait_party_shown(page, name):
    poll(page, f"the Party section to show {name!r}",
         lambda: name in section_text(page, "Party") and members(page))


def wait_no_party(page, gone_name):
    poll(page, "the page to show no party",
         lambda: no_party_shown(page) and gone_name not in section_text(page, "Party"))


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def mode_create(page, ctx, args):
    """a. Log in, create a party in the page; it shows its name and id."""
    log_in(page, args["login"])
    name = args["party"]
    step("create a party in the Create a party form")
    page.get_by_label("Party name", exact=True).fill(name)
    page.get_by_role("button", name="Create", exact=True).click()
    wait_party_shown(page, name)
    party_id = need("party_id")["party_id"]
    step("the Party section shows the id")
    poll(page, f"party id {party_id} in the Party section",
         lambda: party_id in section_text(page, "Party"))
    text = section_text(page, "Party")
    return {
        "party_text": text,
        "copy_button": page.get_by_role("button", name="Copy party id", exact=True).count(),
        "open_marker": bool(re.search(r"\bopen\b", text)),
        "members": members(page),
        "alerts": alerts_text(page),
    }


def mode_live(page, ctx, args):
    """b. A member who joins appears without reload, with path direct and a latency."""
    navigations = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    log_in(page, args["login"])
    host = args["host"]
    step("the page shows the host alone")
    poll(page, f"{host} in Members", lambda: member_row(page, host))
    page.evaluate("window.__lanrageNoReload = 1")
    before = len(navigations)
    need("join")
    step("the new member appears without reload")
    joiner = args["joiner"]
    _, appeared_ms = poll(page, f"{joiner} in Members", lambda: member_row(page, joiner),
                          timeout_ms=10_000, every_ms=20)
    step("the new member's path is direct, with a latency")
    row, _ = poll(page, f"{joiner}'s path 'direct' and a latency",
                  lambda: (lambda r: r if r and r.get("Path") == "direct"
                           and re.search(r"\d", r.get("Latency", "")) else None)(
                      member_row(page, joiner)))
    host_row = member_row(page, host)
    cell = members_table(page).get_by_role("row").filter(has_text=joiner).first
    spark = cell.evaluate("""r => {
      const hs = [...r.closest('table').querySelectorAll('thead th, tr:first-child th')];
      const i = hs.findIndex(h => h.textContent.trim() === 'Latency');
      const c = i >= 0 ? r.cells[i] : null;
      const g = c ? c.querySelector('svg, canvas') : null;
      return {graph: !!g, hidden: !!(g && g.closest('[aria-hidden=true]'))};
    }""")
    return {
        "appeared_ms": round(appeared_ms),
        "reloaded": len(navigations) > before
        or not page.evaluate("window.__lanrageNoReload === 1"),
        "row": row,
        "host_row": host_row,
        "sparkline": spark,
        "headers": members(page)["headers"],
    }


def mode_nearby(page, ctx, args):
    """c. Leave our party; join a protected party on the LAN with its Join button; leave."""
    log_in(page, args["login"])
    own, party, password = args["own"], args["party"], args["password"]
    step("leave our own party with Leave party")
    wait_party_shown(page, own)
    page.get_by_role("button", name="Leave party", exact=True).click()
    wait_no_party(page, own)
    step(f"Parties nearby lists {party!r} with a password field and a Join button")
    poll(page, f"{party!r} in Parties nearby", lambda: party in section_text(page, "Parties nearby"))
    nearby = section(page, "Parties nearby")
    pw = nearby.get_by_label(f"Password for {party}", exact=True)
    join = nearby.get_by_role("button", name=f"Join {party}", exact=True)
    check(pw.count() == 1, f"no input labelled 'Password for {party}'")
    check(join.count() == 1, f"no button 'Join {party}'")
    step("a wrong password is refused and the error shown")
    pw.fill("not-" + password)
    join.click()
    wrong_alert, _ = poll(page, "an error in role=alert", lambda: alerts_text(page))
    need("check_not_member")
    step("the right password joins")
    pw = nearby.get_by_label(f"Password for {party}", exact=True)
    pw.fill(password)
    nearby.get_by_role("button", name=f"Join {party}", exact=True).click()
    wait_party_shown(page, party)
    need("check_member")
    rows = members(page)
    step("Leave party")
    page.get_by_role("button", name="Leave party", exact=True).click()
    wait_no_party(page, party)
    return {"wrong_password_alert": wrong_alert, "members": rows}


def mode_hostile(page, ctx, args):
    """d. Hostile names are text: no dialog, no element made from them."""
    dialogs = []

    def on_dialog(d):
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    log_in(page, args["login"])
    hostile_party, hostile_member = args["hostile_party"], args["hostile_member"]
    step("the hostile party name shows as text in Parties nearby")
    nearby_text, _ = poll(page, "the hostile party in Parties nearby",
                          lambda: (lambda t: t if hostile_party in t else None)(
                              section_text(page, "Parties nearby")))
    join_button = page.get_by_role("button", name=f"Join {hostile_party}", exact=True).count()
    need("join")
    step("the hostile member name shows as text in Members")
    poll(page, "the hostile member in Members", lambda: member_row(page, hostile_member))
    # onerror would fire after the image failed to load: give it time.
    page.wait_for_timeout(1500)
    return {
        "dialogs": dialogs,
        "join_button": join_button,
        "imgs_in_table": members_table(page).locator("img").count(),
        "imgs_in_page": page.locator("img").count(),
        "members": members(page),
        "nearby_text": nearby_text,
    }


def mode_origin(page, ctx, args):
    """e. Another origin can neither drive the daemon nor read it."""
    log_in(page, args["login"])
    cookies = [c for c in ctx.cookies() if c["name"].startswith("lanrage_session")]
    check(len(cookies) == 1, f"one session cookie after login, got {cookies}")
    cookie = f"{cookies[0]['name']}={cookies[0]['value']}"
    from_page = {}
    step("requests naming another Origin, with the session cookie")
    # A bare request context: it shares nothing with the browser, so the headers are exactly ours.
    req = PW.request.new_context()
    try:
        own = req.get(f"{BASE}/session", headers={"Cookie": cookie, "Origin": BASE})
        from_page["own_session"] = own.json()
        evil = {"Cookie": cookie, "Origin": "http://evil.example"}
        from_page["evil_leave"] = req.post(f"{BASE}/party/leave", headers=evil).status
        r = req.get(f"{BASE}/status", headers={"Origin": "http://evil.example"})
        from_page["evil_status"] = r.status
        from_page["evil_status_acao"] = r.headers.get("access-control-allow-origin")
    finally:
        req.dispose()
    step("a page on another origin (in the same browser, logged in) tries")
    evil_page = ctx.new_page()
    evil_page.route(
        "http://evil.example/**",
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>evil</title>"
        ),
    )
    evil_page.goto("http://evil.example/")
    from_page["evil_page_read"] = evil_page.evaluate(
        """base => fetch(base + '/status', {credentials: 'include'})
             .then(r => r.text()).then(t => 'read:' + t.slice(0, 60), e => 'refused:' + e)""",
        BASE,
    )
    from_page["evil_page_post"] = evil_page.evaluate(
        """base => fetch(base + '/party/leave', {method: 'POST', mode: 'no-cors', credentials: 'include'})
             .then(r => 'sent:' + r.type, e => 'refused:' + e)""",
        BASE,
    )
    evil_page.close()
    need("check_still_member")
    return from_page


def mode_screenshots(page, ctx, args):
    """f. The page with a 2-member party, at desktop and phone width."""
    log_in(page, args["login"])
    step("wait for a settled 2-member party")
    for m in args["members"]:
        poll(page, f"{m} in Members", lambda m=m: member_row(page, m))
    joiner = args["members"][1]
    poll(page, f"{joiner} direct with a latency",
         lambda: (lambda r: r and r.get("Path") == "direct"
                  and re.search(r"\d", r.get("Latency", "")))(member_row(page, joiner)))
    if args.get("nearby"):
        poll(page, "the nearby party",
             lambda: args["nearby"] in section_text(page, "Parties nearby"))
    # A few seconds of latency history for the sparkline.
    page.wait_for_timeout(args.get("settle_ms", 4000))
    out = args["out"]
    shots = {}
    for name, (w, h) in {"webui-desktop.png": (1280, 800), "webui-phone.png": (375, 812)}.items():
        step(f"screenshot {name} at {w}x{h}")
        page.set_viewport_size({"width": w, "height": h})
        page.wait_for_timeout(300)
        path = os.path.join(out, name)
        page.screenshot(path=path, full_page=True)
        shots[name] = {
            "path": path,
            "scroll_width": page.evaluate("document.documentElement.scrollWidth"),
            "viewport_width": w,
        }
    return {"shots": shots}


MODES = {
    "create": mode_create,
    "live": mode_live,
    "nearby": mode_nearby,
    "hostile": mode_hostile,
    "origin": mode_origin,
    "screenshots": mode_screenshots,
}

PW = None


def main():
    global PW
    if len(sys.argv) != 3 or sys.argv[1] not in MODES:
        print(f"usage: {sys.argv[0]} {{{','.join(MODES)}}} ARGS_JSON", file=sys.stderr)
        return 2
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    console = []
    with sync_playwright() as p:
        PW = p
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        ctx = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.on("response", lambda r: console.append(f"HTTP {r.status}: {r.url}")
                if r.status >= 400 else None)
        try:
            results = MODES[mode](page, ctx, args)
            results["console"] = console
            emit({"done": True, "ok": True, "results": results})
            return 0
        except Exception as e:  # report any failure as JSON, with what the page showed
            html = ""
            try:
                html = page.content()
                art = os.environ.get("LANRAGE_WEBUI_ARTIFACTS")
                if art:
                    page.screenshot(path=os.path.join(art, f"fail-{mode}.png"), full_page=True)
            except Exception:
                pass
            emit({
                "done": True,
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "step": current_step,
                "html": html[:6000],
                "console": console[-30:],
            })
            return 1
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
