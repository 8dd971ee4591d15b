"""The Audit page in a real browser (system Chromium through Playwright, as test_browser.py):
a heatmap cell opens the search page on the faces behind that gap, with the right count, and the
back button returns to the audit."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from helpers import api, serve_index  # tests/ is on sys.path (pytest's prepend import mode)

N_FACES = 40  # helpers.build_index's default (the web_index fixture)


@pytest.fixture(scope="module")
def server(web_index):
    yield from serve_index(web_index.index)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_a_heatmap_cell_shows_its_faces_and_back_returns_to_the_audit(page, server):
    from playwright.sync_api import expect

    report = api(server, "/api/audit")
    # The cell with the largest gap whose faces exist: its query is the worse group's errors.
    gap = next(g for g in report["largest_gaps"] if api(server, "/api/query", q=g["query"], limit=0)["total"] > 0)
    want = api(server, "/api/query", q=gap["query"], limit=100, eval="false")
    page.goto(server.url + "audit")
    cell = page.locator(f"table.heat a[data-attribute='{gap['attribute']}'][data-by='{gap['by']}']")
    expect(cell).to_have_text(f"{gap['equalized_odds']:.3f}")
    cell.click()
    page.wait_for_function("(t) => document.getElementById('count').textContent === t",
                           arg=f"{want['total']} of {N_FACES} images match")
    assert parse_qs(urlsplit(page.url).query)["q"] == [gap["query"]]
    assert page.input_value("#expr") == gap["query"]
    shown = page.eval_on_selector_all(".card[data-id]", "cs => cs.sort((a, b) => a.dataset.rank - b.dataset.rank)"
                                                        ".map((c) => Number(c.dataset.id))")
    assert shown == [h["id"] for h in want["hits"]][:len(shown)] and shown
    page.go_back()
    expect(page.locator("table.heat")).to_be_visible()
    assert urlsplit(page.url).path == "/audit"


def test_an_attribute_bar_links_to_its_disagreements(page, server):
    from playwright.sync_api import expect

    report = api(server, "/api/audit")
    row = max(report["attributes"], key=lambda r: r["false_negatives"]["count"])
    page.goto(server.url + "audit")
    link = page.locator(f"#a-bars a[data-q='{row['false_negatives']['query']}']")
    expect(link).to_contain_text(f"{row['false_negatives']['count']} (")
    link.click()
    page.wait_for_function("(t) => document.getElementById('count').textContent === t",
                           arg=f"{row['false_negatives']['count']} of {N_FACES} images match")


def test_a_bad_grouping_shows_one_line(page, server):
    from playwright.sync_api import expect

    page.goto(server.url + "audit?by=Mael")
    expect(page.locator("#error")).to_contain_text("unknown attribute 'Mael'")


def test_shift_click_on_a_chip_requires_then_excludes_the_label(page, server):
    """Part 1 on the page: a chip cycles the prediction on click and the ground-truth label on
    shift-click, and both mix in one expression."""
    page.goto(server.url + "?" + urlencode({"q": "Male"}))
    chip = page.locator(".chip[data-name='Eyeglasses']")
    for expr in ("Male and label:Eyeglasses", "Male and not label:Eyeglasses", "Male"):
        want = api(server, "/api/query", q=expr, limit=0)["total"]
        chip.click(modifiers=["Shift"])
        page.wait_for_function("([q, t]) => document.getElementById('expr').value === q && "
                               "document.getElementById('count').textContent === t",
                               arg=[expr, f"{want} of {N_FACES} images match"])
        assert ("label-" in (chip.get_attribute("class") or "")) == (expr != "Male")
    chip.click()  # a plain click still cycles the prediction, beside the label literal
    page.wait_for_function("() => document.getElementById('expr').value === 'Male and Eyeglasses'")


def test_the_audit_page_draws_under_its_own_content_security_policy(browser, server):
    """The other tests bypass the CSP (Playwright's waits need eval); here the page keeps it, so an
    inline style or script would be refused and show in the console."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    refused: list[str] = []
    pg.on("console", lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        pg.goto(server.url + "audit")
        cell = pg.locator("table.heat a").first
        expect(cell).to_have_css("display", "block")             # audit.css applied
        expect(pg.locator(".a-legend i.label")).to_have_css("background-color", "rgb(130, 80, 223)")
        assert not refused, refused
    finally:
        context.close()
