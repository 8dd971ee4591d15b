"""The search page in a real browser: Playwright drives the system Chromium against a real
`facefind serve` subprocess on a free port, and checks what a person would look at.

Chromium is launched from its binary (never `playwright install`); the tests skip, saying so,
only where no Chromium binary exists (CI installs one, see .ci/run). The page's own
Content-Security-Policy forbids eval, which Playwright's wait_for_function needs, so the test
contexts bypass CSP; the header itself is checked in test_server.py.

Search by person runs against a second server over a small index built with identity
descriptors (helpers.build_people_index); the main index has none, so the page hides the
Look / Person switch there. The photo view (a face entry's panel shows the whole photo with a
box over each of its faces) runs against a third server over composed group photos indexed one
entry per face (helpers.build_photo_index).

Also here, because it needs a real server process: 8 concurrent clients making mixed (partly
hostile) requests get only the statuses they should, and the server keeps serving.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from helpers import Built, People, PhotoIndex, api, serve_index  # tests/ is on sys.path (pytest's prepend import mode)

N_FACES = 40  # helpers.build_index's default (the web_index fixture)
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def built(web_index: Built) -> Built:
    return web_index


@pytest.fixture(scope="module")
def server(built: Built):
    yield from serve_index(built.index)


@pytest.fixture(scope="module")
def people(people_index: People) -> People:
    return people_index


@pytest.fixture(scope="module")
def people_server(people: People):
    yield from serve_index(people.index)


@pytest.fixture(scope="module")
def photo_server(photo_index: PhotoIndex):
    yield from serve_index(photo_index.index)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.server_url = server.url  # type: ignore[attr-defined]
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def wait_count(page, total: int) -> None:
    page.wait_for_function("(t) => document.getElementById('count').textContent === t",
                           arg=f"{total} of {N_FACES} images match")


_SHOWN_JS = """([text, ids]) => {
  if (document.getElementById('count').textContent !== text) return false;
  const shown = [...document.querySelectorAll('.card[data-id]')]
    .sort((a, b) => a.dataset.rank - b.dataset.rank).map((c) => Number(c.dataset.id));
  return shown.length >= Math.min(ids.length, 8) && shown.every((id, i) => id === ids[i]);
}"""


def wait_results(page, want: dict) -> None:
    """Until the page shows ``want``'s count and its hits in rank order (counts alone can tie)."""
    page.wait_for_function(_SHOWN_JS, arg=[f"{want['total']} of {N_FACES} images match",
                                           [h["id"] for h in want["hits"]]])


def wait_thumbnails(page, n: int) -> None:
    page.wait_for_function("(n) => { const im = [...document.querySelectorAll('img.thumb')];"
                           " return im.length >= n && im.slice(0, n).every((i) => i.complete && i.naturalWidth > 0); }",
                           arg=n)


def expected(server, q: str | None = None, **params) -> dict:
    return api(server, "/api/query", **({"q": q} if q else {}), limit=1000, eval="false", **params)


# -- as a person would ------------------------------------------------------------------------


def test_a_typed_query_shows_its_count_and_thumbnails(page, server) -> None:
    expr = "Eyeglasses or not Male"
    want = expected(server, expr)
    assert 0 < want["total"] < N_FACES
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.fill("#expr", expr)
    page.press("#expr", "Enter")
    wait_results(page, want)
    wait_thumbnails(page, min(want["total"], 10))
    assert parse_qs(urlsplit(page.url).query)["q"] == [expr]
    first = page.locator(".card[data-rank='1']")
    assert first.locator(".m span").all_inner_texts() == want["hits"][0]["matched"]


def test_autocomplete_completes_attribute_names(page) -> None:
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.wait_for_selector(".chip[data-name='Eyeglasses']")  # the names the list completes have loaded
    page.click("#expr")
    page.keyboard.type("Male and eyegl")
    # The list follows each keystroke ("Ma" offers Male first): wait for the one for the last word.
    from playwright.sync_api import expect

    expect(page.locator("#suggest li").first).to_have_text("Eyeglasses")
    page.keyboard.press("Tab")
    assert page.input_value("#expr") == "Male and Eyeglasses"


def test_autocomplete_suggests_once_the_names_arrive(page) -> None:
    """Typing before /api/attributes has answered: the list appears when the names do, not at the
    next keystroke."""
    from playwright.sync_api import expect

    held = []
    page.route("**/api/attributes", lambda route: held.append(route))  # held until the word is typed
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.click("#expr")
    page.keyboard.type("eyegl")
    assert held and page.is_hidden("#suggest")
    held[0].continue_()
    expect(page.locator("#suggest li").first).to_have_text("Eyeglasses")
    page.keyboard.press("Tab")
    assert page.input_value("#expr") == "Eyeglasses"


def test_a_chip_click_changes_the_expression_and_the_results(page, server) -> None:
    page.goto(page.server_url + "?" + urlencode({"q": "Male"}))
    wait_results(page, expected(server, "Male"))
    assert "require" in page.get_attribute(".chip[data-name='Male']", "class")
    chip = page.locator(".chip[data-name='Smiling']")
    for expr in ("Male and Smiling", "Male and not Smiling", "Male"):
        chip.click()
        want = expected(server, expr)
        page.wait_for_function("(e) => document.getElementById('expr').value === e", arg=expr)
        wait_results(page, want)
    assert "ignore" in chip.get_attribute("class")
    page.fill("#expr", "Young and not Bald")  # typing updates the chips
    page.wait_for_function("() => document.querySelector(\".chip[data-name='Bald']\").classList.contains('exclude')")
    assert "require" in page.get_attribute(".chip[data-name='Young']", "class")


def test_a_face_opens_its_panel_and_more_like_this_ranks_it_first(page, server, built: Built) -> None:
    expr = "Eyeglasses or not Male"
    want = expected(server, expr)
    page.goto(page.server_url + "?" + urlencode({"q": expr}))
    wait_results(page, want)
    target = want["hits"][min(3, want["total"] - 1)]["id"]
    page.click(f".card[data-id='{target}']")
    page.wait_for_selector("#panel:not([hidden]) .probs")
    assert page.is_hidden("#by") and page.is_hidden("#panel .by")  # no identities in this index
    rows = page.locator("#panel .probs tr:has(td)")
    assert rows.count() == len(built.attributes)
    path = next(p for p, i in built.ids.items() if i == target)
    truth = page.locator("#panel .probs td.truth").all_inner_texts()
    assert truth == ["✓ yes" if built.labels[path][a] else "no" for a in built.attributes]
    page.click("#panel button.more")
    page.wait_for_function("() => new URLSearchParams(location.search).get('like_id') !== null")
    similar = expected(server, expr, like_id=target)
    assert similar["hits"][0]["id"] == target
    wait_results(page, similar)
    assert page.input_value("#expr") == expr  # the filter is kept


def test_an_uploaded_indexed_face_comes_back_first(page, built: Built) -> None:
    photo = built.images[9]
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.set_input_files("#photo", str(photo))
    page.wait_for_selector("#ref:not([hidden])", timeout=120_000)  # the first upload loads torch + the model
    page.wait_for_function("(t) => { const c = document.querySelector(\".card[data-rank='1']\");"
                           " return c && Number(c.dataset.id) === t; }", arg=built.ids[str(photo)])
    assert "like" in parse_qs(urlsplit(page.url).query)
    # dropping a photo onto the page does the same
    other = built.images[17]
    data = base64.b64encode(other.read_bytes()).decode()
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: 'image/jpeg' }));
        window.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", [data, other.name])
    page.wait_for_function("(t) => { const c = document.querySelector(\".card[data-rank='1']\");"
                           " return c && Number(c.dataset.id) === t; }", arg=built.ids[str(other)])
    assert other.name in page.inner_text("#ref")
    # the URL carries the server's short reference, not the photo's embedding
    assert len(page.url) < 200 and len(parse_qs(urlsplit(page.url).query)["like"][0]) == 24


def test_a_too_large_photo_is_refused_in_the_page_before_sending(page) -> None:
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/api/similar" in r.url else None)
    page.set_input_files("#photo", files=[{"name": "huge.jpg", "mimeType": "image/jpeg",
                                           "buffer": b"\xff\xd8" + b"\0" * (21 << 20)}])
    page.wait_for_selector("#error:not([hidden])")
    assert "huge.jpg is 21.0 MB, over the 20 MB" in page.inner_text("#error") and sent == []


def test_a_photo_without_a_face_is_searched_whole_with_the_switch_off(page, tmp_path: Path) -> None:
    from PIL import Image

    wall = tmp_path / "wall.png"
    Image.new("RGB", (400, 300), (90, 140, 200)).save(wall)
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.set_input_files("#photo", str(wall))
    page.wait_for_selector("#error:not([hidden])", timeout=120_000)
    error = page.inner_text("#error")
    assert "no face found in wall.png" in error and "Find the face" in error and "--no-detect-face" not in error
    page.uncheck("#detect")
    page.set_input_files("#photo", str(wall))
    page.wait_for_selector("#ref:not([hidden])", timeout=120_000)
    assert "wall.png" in page.inner_text("#ref")


def test_the_layout_at_1366_px(browser, server) -> None:
    """Cards fill the width, their tags show whole, and the face panel leaves the header's buttons free."""
    context = browser.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(server.url + "?q=" + "Male or not Male")  # every card carries a tag
        wait_count(page, N_FACES)
        wait_thumbnails(page, 6)
        geo = page.evaluate("""() => {
            const grid = document.getElementById('grid').getBoundingClientRect();
            const cards = [...document.querySelectorAll('.card[data-id]')].map((c) => c.getBoundingClientRect());
            const clipped = [...document.querySelectorAll('.card[data-id]')].filter((c) => {
                const box = c.getBoundingClientRect(), m = c.querySelector('.m').getBoundingClientRect();
                return [...c.querySelectorAll('.m span')].some((s) => {
                    const r = s.getBoundingClientRect(); return r.bottom > Math.min(box.bottom, m.bottom) + 0.5; });
            }).length;
            return { right: grid.right, cardsRight: Math.max(...cards.map((r) => r.right)), clipped };
        }""")
        assert geo["right"] - geo["cardsRight"] < 12, geo  # no empty band (10 px is the cards' gap)
        assert geo["clipped"] == 0
        page.click(".card[data-rank='1']")
        page.wait_for_selector("#panel:not([hidden])")
        header = page.eval_on_selector("header", "h => h.getBoundingClientRect().bottom")
        panel = page.eval_on_selector("#panel", "p => p.getBoundingClientRect().top")
        assert panel >= header - 0.5
        page.click("#go")  # the header's buttons still take clicks with the panel open
    finally:
        context.close()


def test_typing_a_name_flashes_no_error_while_suggestions_show(page) -> None:
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.wait_for_selector(".chip[data-name='Eyeglasses']")
    page.click("#expr")
    page.keyboard.type("Eyegl")
    page.wait_for_selector("#suggest:not([hidden])")
    page.wait_for_timeout(800)  # past the live search's 350 ms pause
    assert page.is_hidden("#error")


def _person_shown(pg, want: dict) -> None:
    """Until ``pg`` shows ``want``'s hits in order, each card marked 'same person' exactly when
    the API says so, with its distance."""
    pg.wait_for_function(_SHOWN_JS, arg=[f"{want['total']} of {want['n_indexed']} images match",
                                         [h["id"] for h in want["hits"]]])
    same = {h["id"]: h["same_person"] for h in want["hits"]}
    distance = {h["id"]: f"distance {h['distance']:.3f}" for h in want["hits"]}
    cards = pg.evaluate("() => [...document.querySelectorAll('.card[data-id]')].map((c) => "
                        "[Number(c.dataset.id), !!c.querySelector('.m .same'), c.querySelector('.score').textContent])")
    assert cards and all(mark == same[i] and score == distance[i] for i, mark, score in cards), cards


def test_person_ranks_by_identity_and_marks_the_same_person(browser, people_server, people: People,
                                                             tmp_path: Path) -> None:
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    original, other = people.ids[str(people.original)], people.ids[str(people.other)]
    look = api(people_server, "/api/query", like_id=original, limit=1000, eval="false")
    person = api(people_server, "/api/query", like_id=original, by="person", limit=1000, eval="false")
    assert [h["id"] for h in person["hits"][:2]] == [original, other]
    assert [h["id"] for h in look["hits"]] != [h["id"] for h in person["hits"]]

    pg.goto(people_server.url + "?" + urlencode({"like_id": original}))
    pg.wait_for_function(_SHOWN_JS, arg=[f"{look['total']} of {look['n_indexed']} images match",
                                         [h["id"] for h in look["hits"]]])
    assert pg.locator(".card .same").count() == 0
    assert pg.get_attribute("#by button[data-by='look']", "aria-pressed") == "true"
    pg.click("#by button[data-by='person']")
    _person_shown(pg, person)
    assert pg.locator(".card .same").count() >= 2  # the face itself and its other photo
    assert parse_qs(urlsplit(pg.url).query)["by"] == ["person"]
    assert "identity distance" in pg.inner_text("#ref")
    pg.go_back()  # the choice is history like the rest of the state
    pg.wait_for_function(_SHOWN_JS, arg=[f"{look['total']} of {look['n_indexed']} images match",
                                         [h["id"] for h in look["hits"]]])
    assert "by" not in parse_qs(urlsplit(pg.url).query)

    # the panel's switch, then a photo searched by person, then the same photo by look
    pg.click(f".card[data-id='{other}']")
    pg.wait_for_selector("#panel:not([hidden]) .by:not([hidden])")
    pg.click("#panel .by button[data-by='person']")
    _person_shown(pg, person)
    photo = tmp_path / "me.jpg"
    photo.write_bytes(people.original.read_bytes())
    pg.set_input_files("#photo", str(photo))
    pg.wait_for_function("() => new URLSearchParams(location.search).get('ref') === 'me.jpg'", timeout=120_000)
    state = parse_qs(urlsplit(pg.url).query)
    assert state["by"] == ["person"]
    by_photo = api(people_server, "/api/query", like=state["like"][0], by="person", limit=1000, eval="false")
    assert by_photo["hits"][0]["id"] == original
    _person_shown(pg, by_photo)
    pg.click("#by button[data-by='look']")  # the photo is searched again, by look this time
    pg.wait_for_function("() => document.querySelector('.card .score') && "
                         "!document.querySelector('.card .score').textContent.startsWith('distance')", timeout=120_000)
    assert pg.locator(".card .same").count() == 0 and "by" not in parse_qs(urlsplit(pg.url).query)
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


_PHOTO_JS = """() => {
  const img = document.querySelector('#panel .photo img.full');
  if (!img) return null;
  const r = img.getBoundingClientRect();
  return { img: [r.x, r.y, r.width, r.height, img.naturalWidth, img.naturalHeight],
           boxes: [...document.querySelectorAll('#panel .photo .facebox')].map((b) => {
             const q = b.getBoundingClientRect();
             return [Number(b.dataset.id), q.x, q.y, q.width, q.height, b.classList.contains('on')]; }) };
}"""


def _boxes_drawn(pg, faces: list[dict], selected: int) -> None:
    """The panel shows the whole photo, shrunk to fit, with one box per face where the API's box
    lands once scaled to the displayed photo, and only ``selected``'s box highlighted."""
    pg.wait_for_function("(id) => { const on = document.querySelectorAll('#panel .facebox.on');"
                         " return on.length === 1 && Number(on[0].dataset.id) === id; }", arg=selected)
    shown = pg.evaluate(_PHOTO_JS)
    x0, y0, width, height, natural_w, natural_h = shown["img"]
    assert (natural_w, natural_h) == (800, 340) and width < 800  # the group photo, scaled down
    sx, sy = width / natural_w, height / natural_h
    boxes = {i: (x, y, w, h, on) for i, x, y, w, h, on in shown["boxes"]}
    assert sorted(boxes) == sorted(f["id"] for f in faces)
    for f in faces:
        x, y, w, h = f["box"]
        want = (x0 + x * sx, y0 + y * sy, w * sx, h * sy)
        assert boxes[f["id"]][:4] == pytest.approx(want, abs=1.0), (f, boxes[f["id"]], want)
        assert boxes[f["id"]][4] == (f["id"] == selected)
    assert pg.inner_text("#panel .top strong") == f"image #{selected}"


def test_a_face_shows_its_photo_with_a_box_on_every_face(browser, photo_server, photo_index: PhotoIndex) -> None:
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    n = len(photo_index.hits)
    pg.goto(photo_server.url)
    pg.wait_for_function(_SHOWN_JS, arg=[f"{n} of {n} images match", [h["id"] for h in photo_index.hits]])
    labels = pg.evaluate("() => Object.fromEntries([...document.querySelectorAll('.card[data-id]')].map((c) => "
                         "[c.dataset.id, c.querySelector('.face') ? c.querySelector('.face').textContent : null]))")
    assert labels == {str(h["id"]): f"face {h['face']}" if h["box"] else None for h in photo_index.hits}

    group = photo_index.of("group.jpg")
    faces = [{"id": h["id"], "face": h["face"], "box": h["box"]} for h in group]
    first, other = group[1]["id"], group[2]["id"]
    pg.click(f".card[data-id='{first}']")
    _boxes_drawn(pg, faces, first)
    assert "face 1 of 3" in pg.inner_text("#panel .path")
    pg.click(f"#panel .facebox[data-id='{other}']")  # another face of the photo opens its entry
    _boxes_drawn(pg, faces, other)
    assert parse_qs(urlsplit(pg.url).query)["sel"] == [str(other)]
    assert pg.locator(".card.sel").get_attribute("data-id") == str(other)
    pg.click("#panel button.more")  # and "more like this" searches by that face
    pg.wait_for_function(_SHOWN_JS, arg=[f"{n} of {n} images match",
                                         [h["id"] for h in api(photo_server, "/api/query", like_id=other,
                                                               limit=100, eval="false")["hits"]]])
    assert pg.locator(".card[data-rank='1']").get_attribute("data-id") == str(other)

    [crop] = photo_index.of("crop.jpg")  # a whole-file entry: the file as before, no boxes
    pg.goto(photo_server.url + "?" + urlencode({"sel": crop["id"]}))
    pg.wait_for_selector("#panel:not([hidden]) .probs")
    assert pg.locator("#panel > img.full").count() == 1 and pg.locator("#panel .facebox, #panel .photo").count() == 0
    assert pg.locator("#panel .path .face").count() == 0
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_the_threshold_set_selector(page, server) -> None:
    page.goto(page.server_url + "?" + urlencode({"q": "Male"}))
    wait_results(page, expected(server, "Male"))
    page.select_option("#thr", "accuracy")
    strict = expected(server, "Male", thresholds="accuracy")
    assert strict["total"] < expected(server, "Male")["total"]
    wait_results(page, strict)
    assert parse_qs(urlsplit(page.url).query)["thresholds"] == ["accuracy"]


def test_a_typo_shows_did_you_mean_with_a_caret(page, server) -> None:
    page.goto(page.server_url)
    wait_count(page, N_FACES)
    page.fill("#expr", "Male and Eyeglases")
    page.press("#expr", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert "did you mean Eyeglasses" in text
    assert page.inner_text("#error pre").splitlines()[1] == " " * len("Male and ") + "^"
    page.click("#error button.fix")
    wait_results(page, expected(server, "Male and Eyeglasses"))
    assert page.input_value("#expr") == "Male and Eyeglasses" and page.is_hidden("#error")


def test_the_back_button_restores_the_previous_query(page, server) -> None:
    page.goto(page.server_url + "?" + urlencode({"q": "Male"}))
    male, smiling = expected(server, "Male"), expected(server, "Smiling")
    assert [h["id"] for h in male["hits"]] != [h["id"] for h in smiling["hits"]]
    wait_results(page, male)
    page.fill("#expr", "Smiling")
    page.press("#expr", "Enter")
    wait_results(page, smiling)
    page.go_back()
    wait_results(page, male)
    assert page.input_value("#expr") == "Male" and parse_qs(urlsplit(page.url).query)["q"] == ["Male"]
    page.go_forward()
    wait_results(page, smiling)
    assert page.input_value("#expr") == "Smiling"


def test_a_shared_link_restores_the_state(page, server) -> None:
    want = expected(server, "Smiling", like_id=5)
    page.goto(page.server_url + "?" + urlencode({"q": "Smiling", "like_id": 5, "sel": want["hits"][0]["id"]}))
    wait_results(page, want)
    page.wait_for_selector("#panel:not([hidden]) .probs")
    assert "image #5" in page.inner_text("#ref")


def test_export_buttons_download_the_matches(page, server) -> None:
    page.goto(page.server_url + "?" + urlencode({"q": "Male"}))
    wait_results(page, expected(server, "Male"))
    with page.expect_download() as info:
        page.click("#exp-paths")
    lines = Path(info.value.path()).read_text().splitlines()
    assert lines == [h["path"] for h in expected(server, "Male")["hits"]]


def test_the_model_page_draws_metrics_and_curves(page, built: Built) -> None:
    page.goto(page.server_url + "model")
    page.wait_for_selector(".metric-grid .name")
    assert sorted(page.locator(".metric-grid .name").all_inner_texts()) == sorted(built.attributes)
    assert page.locator(".metric-grid .hbar").count() == 3 * len(built.attributes)
    assert page.locator("#curves svg polyline").count() >= 4  # 2 loss curves + accuracy + F1


def test_screenshot(page, server, tmp_path: Path) -> None:
    """The README's screenshot: saved to $FACEFIND_SCREENSHOT when set, of the index at
    $FACEFIND_SCREENSHOT_INDEX when set (docs/serve.png shows the demo's index)."""
    from facefind.retrieval.bench.serve import Served

    expr = os.environ.get("FACEFIND_SCREENSHOT_QUERY", "Smiling and not Male")
    other = os.environ.get("FACEFIND_SCREENSHOT_INDEX")
    served = (Served([sys.executable, "-c", "from facefind.retrieval.cli import main; main()", "serve", "--index", other,
                      "--port", "0"], timeout=180) if other else None)
    try:
        where = served or server
        want = api(where, "/api/query", q=expr, limit=60, eval="false")
        page.goto(where.url + "?" + urlencode({"q": expr}))
        page.wait_for_function(_SHOWN_JS, arg=[f"{want['total']:,} of {want['n_indexed']:,} images match",
                                               [h["id"] for h in want["hits"]]])
        wait_thumbnails(page, min(want["total"], 10))
        if want["hits"]:
            page.click(".card[data-rank='1']")
            page.wait_for_selector("#panel:not([hidden]) .probs")
            page.wait_for_function("() => document.querySelector('#panel img.full').complete")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
    finally:
        if served is not None:
            served.stop()
    assert shot.stat().st_size > 10_000
    if os.environ.get("FACEFIND_SCREENSHOT"):  # a 256-colour palette keeps the committed PNG small
        from PIL import Image

        with Image.open(shot) as img:
            img.convert("RGB").quantize(256).save(os.environ["FACEFIND_SCREENSHOT"], optimize=True)


def test_a_huge_result_scrolls_by_offset_with_a_bounded_dom(browser, built: Built, tmp_path: Path) -> None:
    """20,000 synthetic matches (the grid is the same at 150,000): the scrollbar spans them all,
    a jump fetches the page at that offset, and only the rows near the viewport exist."""
    from facefind.retrieval.bench.serve import PAINTED_JS, Served

    args = [sys.executable, "-c", "from facefind.retrieval.bench.serve import serve_main; serve_main()", "20000", "0",
            str(built.root / "img_align_celeba"), str(tmp_path / "thumbs")]
    with Served(args, timeout=180, env={"OMP_NUM_THREADS": "1"}) as big:
        want = api(big, "/api/query", q="not Bald", limit=0)["total"]
        assert want > 15_000
        context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
        pg = context.new_page()
        pg.goto(big.url + "?" + urlencode({"q": "not Bald"}))
        pg.wait_for_function(PAINTED_JS, arg=20)
        assert pg.inner_text("#count") == f"{want:,} of 20,000 images match"
        pg.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        pg.wait_for_selector(f".card[data-rank='{want}'][data-id]")  # the very last match
        pg.evaluate("() => { const g = document.getElementById('grid'); window.scrollTo(0, g.offsetTop + g.offsetHeight / 2); }")
        pg.wait_for_function(PAINTED_JS, arg=20)
        ranks = pg.evaluate("() => [...document.querySelectorAll('.card[data-id]')].map((c) => Number(c.dataset.rank))")
        assert abs(sorted(ranks)[len(ranks) // 2] - want / 2) < 200 and len(ranks) < 300
        pg.wait_for_function("() => Number(new URLSearchParams(location.search).get('offset')) > 5000")
        offset = int(parse_qs(urlsplit(pg.url).query)["offset"][0])
        pg.reload()  # the offset in the URL brings the reader back to the same place
        pg.wait_for_function(PAINTED_JS, arg=20)
        ranks = pg.evaluate("() => [...document.querySelectorAll('.card[data-id]')].map((c) => Number(c.dataset.rank))")
        assert min(ranks) <= offset + 1 <= max(ranks)
        context.close()


# -- a real server under concurrent, partly hostile load -----------------------------------------


def test_concurrent_clients_get_no_errors(server, built: Built) -> None:
    from facefind.retrieval.bench.serve import load_run, mixed_requests

    ids = sorted(built.ids.values())
    result = load_run(server, mixed_requests(ids, ["Male", "Smiling and not Young", "Eyeglasses or Bald"]),
                      clients=8, requests=25)
    assert result["errors"] == 0, result["error_samples"]
    assert result["server_alive"] and api(server, "/api/info")["n_indexed"] == N_FACES
