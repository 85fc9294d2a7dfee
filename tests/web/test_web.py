"""The web page in headless Chromium, against the real app (uvicorn on 127.0.0.1) and real photos.

A catalogue of 12 AirBnB photos (4 of each of 3 listings; a 5th photo of each listing is kept out as
a query) is indexed with the shipped model and deduplicated before the server starts. The tests then
use the page as a person would: search with a photo, open an explanation and play with its controls,
review duplicate pairs with the keyboard and reload. Needs Debian's ``chromium`` (``.ci/chromium.sh``
installs it) and the ``playwright`` package: skipped with the reason when either is missing, except on
CI (``CI=true``), where that is a failure.

``WHYMATCH_SCREENSHOTS=1`` saves the screenshots the README shows into ``docs/images/``; otherwise
they go to the test's tmp folder.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import shared_or_skip

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
TOKEN = "web-test-token"
GROUPS = ("living-room/boston_5661892", "kitchen/boston_1369349", "bedroom/berlin_16014791")
LISTING_REGEX = r"^([^/]+/[^_]+_\d+)"
DEDUP_THRESHOLD = 0.5
TIMEOUT_MS = 30_000  # explanations on a shared 2-core machine can take a few seconds

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None


def _unavailable(reason: str) -> None:
    """Skip here; fail on CI, which must run these tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} — CI must run the browser tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if sync_playwright is None:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _unavailable(f"headless Chromium is not installed: {CHROMIUM} is missing (bash .ci/chromium.sh installs it)")
    return CHROMIUM


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """4 photos of each listing in GROUPS copied into a catalogue folder, and one more of each as a query."""
    airbnb = shared_or_skip("airbnb")
    with open(airbnb / "groups.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    root = tmp_path_factory.mktemp("web") / "photos"
    queries = {}
    for group in GROUPS:
        members = [row["path"] for row in rows if row["group"] == group]
        assert len(members) >= 5, f"{group}: expected 5 photos in groups.csv"
        for relative in members[:4]:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(airbnb / relative, root / relative)
        queries[group] = airbnb / members[4]
    return {"root": root, "queries": queries}


@pytest.fixture(scope="module")
def catalogue(photos):
    from engine import load_model
    from indexer import Catalogue

    catalogue = Catalogue(photos["root"].parent / "data", model=load_model(threads=2), log=None)
    report = catalogue.index(photos["root"], listing_regex=LISTING_REGEX)
    assert report.added == 12 and report.skipped == []
    dedup = catalogue.dedup(k=5, threshold=DEDUP_THRESHOLD)
    assert len(dedup.pairs) >= 4, "the shipped model should find the listings' photos as duplicates"
    return catalogue


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(catalogue):
    """The real app (api.app.create_app) served by uvicorn in a background thread."""
    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings

    settings = ApiSettings(_env_file=None, api_token=TOKEN, api_workers=2)
    config = uvicorn.Config(create_app(settings, catalogue=catalogue), host="127.0.0.1", port=_free_port(), log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium))
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture()
def screenshots(tmp_path) -> Path:
    if os.environ.get("WHYMATCH_SCREENSHOTS") == "1":
        folder = REPO / "docs" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def _search(page, query: Path) -> None:
    page.goto("/")
    page.set_input_files("#query-file", str(query))
    expect(page.locator("#search-status")).to_contain_text("matches among", timeout=TIMEOUT_MS)


def _answer_with(body: dict):
    """A route handler answering with ``body`` (one parameter: Playwright passes the request to a second one)."""
    return lambda route: route.fulfill(json=body)


def test_search_with_a_real_photo(page, server, photos, screenshots, tmp_path):
    group = GROUPS[0]
    status = page.locator("#search-status")
    held = []  # the first search request is held back, to see the loading state
    page.route("**/api/search", lambda route: held.append(route))
    page.goto("/")
    with page.expect_request("**/api/search"):
        page.set_input_files("#query-file", str(photos["queries"][group]))
    expect(status).to_have_attribute("data-kind", "loading")
    expect(status).to_contain_text("explaining on CPU, this takes a few seconds")
    expect(status.locator(".spinner")).to_be_visible()
    while not held:
        page.wait_for_timeout(20)
    held[0].continue_()
    page.unroute("**/api/search")

    results = page.locator("#results .result")
    expect(results).to_have_count(10)  # k = 10 of the 12 photos
    expect(status).to_contain_text("10 matches among")
    # The three other photos of the query's listing come first, and are matches; re-ranking is shown.
    listings = [results.nth(n).locator(".listing").inner_text() for n in range(3)]
    assert listings == [group] * 3
    expect(results.first.locator(".badge")).to_have_text("match")
    expect(results.first.locator(".index-score")).to_have_text(re.compile(r"^index \d\.\d\d \(#\d+\)$"))
    expect(results.first.locator(".move")).to_have_text(re.compile(r"^(↑\d+|↓\d+|=)$"))
    expect(results.first.locator("img")).to_have_attribute("src", re.compile("^blob:"))

    # Another query by pasting it (Ctrl+V): the page takes the image from the clipboard event.
    other = photos["queries"][GROUPS[1]]
    page.evaluate("""async ([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/jpeg" }));
        document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data }));
    }""", [list(other.read_bytes()), other.name])
    expect(page.locator("#query-preview")).to_have_attribute("alt", f"Your photo: {other.name}")
    expect(results.first.locator(".listing")).to_have_text(GROUPS[1])
    page.screenshot(path=str(screenshots / "web-search.png"), full_page=True)

    # A truncated upload: the page shows the API's own one-line message.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos["queries"][group].read_bytes()[:300])
    answer = httpx.post(f"{server}/api/search", files={"image": ("broken.jpg", broken.read_bytes(), "image/jpeg")})
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    page.set_input_files("#query-file", str(broken))
    expect(status).to_have_attribute("data-kind", "error")
    expect(status).to_have_text(detail)
    expect(results).to_have_count(0)

    # No matches at all: said in words, telling an unindexed catalogue from one holding only the query.
    for index_size, words in ((0, "nothing in the catalogue is indexed with the server's model yet"),
                              (1, "the catalogue holds no other photos yet")):
        page.unroute("**/api/search")
        body = {"query": "q", "query_sha256": "0" * 64, "k": 10, "threshold": 0.25, "n_candidates": 0, "index_size": index_size,
                "excluded": [], "generation": None, "stale_index": False, "unreadable": [], "matches": []}
        page.route("**/api/search", _answer_with(body))
        page.get_by_role("button", name="Search", exact=True).click()
        expect(status).to_have_attribute("data-kind", "empty")
        expect(status).to_contain_text(f"No matches: {words}")


def test_open_an_explanation_and_use_its_controls(page, photos, screenshots):
    _search(page, photos["queries"][GROUPS[0]])
    page.locator("#results .result-button").first.click()
    dialog = page.locator("#compare-dialog")
    expect(dialog).to_be_visible()
    verdict = dialog.locator(".verdict")
    expect(verdict).to_have_text(re.compile(r"^Match — similarity \d\.\d\d \(threshold \d\.\d\d\)$"))
    heat_b = dialog.locator('.side[data-side="b"] canvas.heat')
    expect(heat_b).to_have_attribute("data-map", "factual_b")
    expect(dialog.locator(".mode-caption")).to_contain_text("decide “match”")

    def pixels_checksum() -> int:
        return page.evaluate("""(canvas) => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let sum = 0;
            for (let i = 0; i < data.length; i += 7) sum = (sum * 31 + data[i]) % 1000000007;
            return sum;
        }""", heat_b.element_handle())

    factual = pixels_checksum()
    assert heat_b.evaluate("c => c.width > 50 && c.height > 50")  # upsampled, not the 14×14 grid
    dialog.locator(".segmented label", has_text="Counterfactual").click()
    expect(dialog.get_by_label("Counterfactual")).to_be_checked()
    expect(heat_b).to_have_attribute("data-map", "counterfactual_b")
    expect(dialog.locator(".mode-caption")).to_contain_text("argue for “no match”")
    assert pixels_checksum() != factual

    slider = dialog.get_by_label("Overlay opacity")
    slider.fill("80")
    expect(dialog.locator(".opacity output")).to_have_text("80%")
    assert heat_b.evaluate("c => getComputedStyle(c).opacity") == "0.8"
    dialog.locator(".segmented label", has_text=re.compile(r"^\s*Factual\s*$")).click()
    expect(dialog.get_by_label("Factual", exact=True)).to_be_checked()
    slider.fill("55")
    expect(heat_b).to_have_attribute("data-map", "factual_b")
    page.screenshot(path=str(screenshots / "web-explanation.png"))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()


def test_more_like_a_match_searches_with_that_catalogue_item(page, photos):
    """From an explained match, "More like this" searches again with that catalogue item as the query:
    no upload, the item itself left out, and its matches explained against it."""
    _search(page, photos["queries"][GROUPS[0]])
    first = page.locator("#results .result-button").first
    item_id = int(re.search(r"item (\d+)", first.get_attribute("aria-label")).group(1))
    first.click()
    dialog = page.locator("#compare-dialog")
    expect(dialog.locator(".verdict")).to_have_text(re.compile(r"^Match — "))
    with page.expect_request("**/api/search") as sent:
        dialog.get_by_role("button", name="More like this").click()
    assert f'name="item"\r\n\r\n{item_id}\r\n' in sent.value.post_data and 'name="image"' not in sent.value.post_data
    expect(dialog).to_be_hidden()
    status = page.locator("#search-status")
    expect(status).to_contain_text("1 catalogue photo is the query itself, left out.")
    expect(page.locator("#query-preview")).to_have_attribute("alt", f"Catalogue item {item_id}")
    expect(page.locator("#query-preview")).to_have_attribute("src", re.compile("^blob:"))
    results = page.locator("#results .result-button")
    expect(results.first).to_have_attribute("aria-label", re.compile(r"^Rank 1: item \d+"))
    labels = [results.nth(n).get_attribute("aria-label") for n in range(results.count())]
    assert all(f"item {item_id}," not in label for label in labels)
    assert page.locator("#results .listing").first.inner_text() == GROUPS[0]
    results.first.click()
    expect(dialog.locator('.side[data-side="a"]')).to_contain_text(f"item {item_id}")
    expect(dialog.locator(".verdict")).to_have_text(re.compile(r"^Match — similarity"))


def test_review_queue_decisions_persist(page, server, catalogue, screenshots):
    from indexer import crud

    page.goto("/#review")
    progress = page.locator("#review-progress-text")
    expect(progress).to_have_text(re.compile(r"^0 of [1-9]\d* reviewed$"))
    total = int(progress.inner_text().split()[2])
    queue = page.locator("#queue-list .queue-item")
    expect(queue).to_have_count(total)
    scores = [float(queue.nth(n).locator(".queue-score").inner_text()) for n in range(total)]
    assert scores == sorted(scores, reverse=True)  # strongest first
    comparison = page.locator("#review-comparison")
    expect(comparison.locator(".verdict")).to_have_text(re.compile(r"^(Match|No match) — similarity"))
    run_pattern = re.compile(r"pairs to review, strongest first — dedup run (\d+) of .+, threshold \d\.\d{3} \(\w[\w ]*\)\.$")
    expect(page.locator("#review-status")).to_have_text(run_pattern)  # which run the queue shows
    run_id = int(run_pattern.search(page.locator("#review-status").inner_text()).group(1))

    # Without a token the write is refused, and the page says how to fix it.
    page.keyboard.press("a")
    status = page.locator("#review-status")
    expect(status).to_have_attribute("data-kind", "error")
    expect(status).to_contain_text("Access")
    token = page.locator("#token")
    expect(token).to_be_focused()
    token.fill(TOKEN)
    page.locator("#reviewer").fill("web test")
    page.locator("#access-form button[type=submit]").click()
    expect(page.locator("#access-state")).to_have_text("token set")

    page.locator("#review-accept").focus()  # keys go to the page, not to a text field
    page.keyboard.press("a")  # accept pair 1 → pair 2
    expect(progress).to_have_text(f"1 of {total} reviewed")
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 2 of {total}")
    page.keyboard.press("s")  # skip pair 2 → pair 3
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 3 of {total}")
    page.locator("#review-note").fill("same bed, other flat")
    page.locator("#review-accept").focus()
    page.keyboard.press("r")  # reject pair 3, with the note → pair 4
    expect(progress).to_have_text(f"2 of {total} reviewed")
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 4 of {total}")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 3 of {total}")
    expect(page.locator("#review-pair-state")).to_have_text("You rejected this pair.")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 4 of {total}")

    page.reload()
    expect(progress).to_have_text(f"2 of {total} reviewed")
    expect(queue.nth(0).locator(".queue-state")).to_have_text("accepted")
    expect(queue.nth(1).locator(".queue-state")).to_have_text("unreviewed")
    expect(queue.nth(2).locator(".queue-state")).to_have_text("rejected")
    expect(page.locator("#review-pair-title")).to_contain_text(f"Pair 2 of {total}")  # the first unreviewed
    expect(page.locator("#access-state")).to_have_text("token set")  # kept in localStorage
    expect(comparison.locator(".verdict")).to_have_text(re.compile(r"^(Match|No match) — similarity"))
    page.screenshot(path=str(screenshots / "web-review.png"), full_page=True)

    pairs = httpx.get(f"{server}/api/duplicates", params={"status": "all", "limit": 3}).json()["pairs"]
    first, third = ((p["item_a"]["id"], p["item_b"]["id"]) for p in (pairs[0], pairs[2]))
    reviews = {(r["item_a"], r["item_b"]): r for r in httpx.get(f"{server}/api/reviews").json()["reviews"]}
    assert set(reviews) == {first, third}
    assert (reviews[first]["decision"], reviews[first]["note"], reviews[first]["reviewer"]) == ("accept", None, "web test")
    assert (reviews[third]["decision"], reviews[third]["note"]) == ("reject", "same bed, other flat")
    with catalogue.db.session() as session:
        assert crud.latest_reviews(session) == {first: "accept", third: "reject"}

    page.get_by_role("button", name="Find duplicates").click()  # a new dedup run from the page
    expect(page.locator("#review-status")).to_contain_text(f"pairs to review, strongest first — dedup run {run_id + 1} of",
                                                           timeout=60_000)
    expect(progress).to_have_text(re.compile(r"^2 of \d+ reviewed"))  # the decisions carry over to the new run

    runs = page.locator("#review-run")  # an earlier run stays reviewable
    expect(runs.locator("option")).to_have_count(httpx.get(f"{server}/api/duplicates/runs").json()["total"])
    expect(runs.locator("option").first).to_contain_text(f"Run {run_id + 1} (latest)")
    runs.select_option(str(run_id))
    expect(page.locator("#review-status")).to_contain_text(f"dedup run {run_id} of")
    expect(progress).to_have_text(f"2 of {total} reviewed")
    runs.select_option(str(run_id + 1))
    expect(page.locator("#review-status")).to_contain_text(f"dedup run {run_id + 1} of")


def test_effects_concepts_and_correspondences_are_shown_when_present(page, catalogue, photos):
    """The engine's optional details, computed for real and handed to the page as /api/compare's answer."""
    from engine.explain.masking import effect_sentences

    query = photos["queries"][GROUPS[2]]
    top = catalogue.search(query, k=1).matches[0]
    explanation = catalogue.model.explain(query, [top.source], effects=True, correspondences=True, concepts=True)[0]
    details = explanation.to_dict()
    assert details["correspondences"] and details["concepts"] and details["effects"]
    page.route("**/api/compare", lambda route: route.fulfill(json=details))

    page.goto(f"/#token={TOKEN}")  # the link `whymatch serve` prints hands the page its token
    expect(page.locator("#access-state")).to_have_text("token set")
    assert "token" not in page.url
    page.get_by_label("Explain matches").uncheck()  # no maps in the search: a click asks /api/compare
    page.set_input_files("#query-file", str(query))
    expect(page.locator("#results .result")).to_have_count(10)
    page.locator("#results .result-button").first.click()
    dialog = page.locator("#compare-dialog")
    expect(dialog.locator(".verdict")).to_have_text(re.compile(r"^Match — "))

    effects = dialog.locator(".effects li")
    expect(effects).to_have_count(2)  # the factual maps of A and B
    shown = " ".join(effects.all_inner_texts()).lower()
    for sentence in effect_sentences(explanation):
        if sentence.startswith(("masking the factual", "the factual")):
            assert sentence.lower() in shown
    expect(dialog.locator('.side[data-side="b"] .effect')).to_contain_text("→")
    dialog.locator(".segmented label", has_text="Counterfactual").click()
    expect(effects.first).to_contain_text("counterfactual region of image A")

    chips = dialog.locator(".concepts .chip")
    expect(chips).to_have_count(len(details["concepts"]))
    expect(chips.first).to_contain_text(details["concepts"][0]["name"])

    boxes = dialog.locator('.side[data-side="a"] svg.boxes rect')
    expect(boxes).to_have_count(0)
    dialog.get_by_label("Numbered correspondences").check()
    expect(boxes).to_have_count(len(details["correspondences"]))
    expect(dialog.locator('.side[data-side="b"] svg.boxes rect')).to_have_count(len(details["correspondences"]))
    first = details["correspondences"][0]
    assert [float(boxes.first.get_attribute(name)) for name in ("x", "y")] == first["box_a"][:2]
    view_box = dialog.locator('.side[data-side="a"] svg.boxes').get_attribute("viewBox")
    with Image.open(query) as photo:  # boxes are in the photo's own pixels
        assert view_box == f"0 0 {photo.width} {photo.height}"


def test_an_empty_dedup_run_is_named_not_mistaken_for_no_run(page, catalogue):
    """A run that kept no pair is still the queue's run: the page says so, rather than asking for a run."""
    from indexer.models import DedupRun

    with catalogue.db.session() as session:
        empty = DedupRun(model_key=catalogue.model_key, threshold=1.0, threshold_source="given", precision_target=None, k=10)
        session.add(empty)
        session.flush()
        run_id = empty.id
    try:
        page.goto("/#review")
        status = page.locator("#review-status")
        expect(status).to_have_attribute("data-kind", "empty")
        expect(status).to_contain_text(f"No duplicate pairs in dedup run {run_id} of")
        expect(status).to_contain_text("threshold 1.000 (given)")
    finally:
        with catalogue.db.session() as session:
            session.delete(session.get(DedupRun, run_id))


def test_verified_point_matches_are_drawn_between_the_photos(page, photos, screenshots):
    """With "Verify geometry" the search verifies its matches: a verified one says so on its card and, opened,
    next to the decision, with its inlier matches drawn as lines from photo A to photo B (a toggle hides them)."""
    query = photos["queries"][GROUPS[1]]  # a kitchen whose other photos re-show it: several verify
    page.goto("/")
    page.get_by_label("Verify geometry").check()
    with page.expect_response("**/api/search") as answered:
        page.set_input_files("#query-file", str(query))
    body = answered.value.json()
    assert all(m["verification"] is not None for m in body["matches"])  # the page asked for verification
    verified = [n for n, m in enumerate(body["matches"]) if m["verification"] and m["verification"]["verified"]]
    assert verified, "the kitchen's own photos should verify"
    assert all(body["matches"][n]["is_match"] for n in verified)
    cards = page.locator("#results .result")
    expect(cards.locator(".verified-badge")).to_have_count(len(verified))
    match = body["matches"][verified[0]]
    cards.nth(verified[0]).locator(".result-button").click()
    dialog = page.locator("#compare-dialog")
    expect(dialog.locator(".verdict")).to_have_text(re.compile(r"^Match — similarity"))
    note = dialog.locator(".comparison-head .verification")
    expect(note).to_have_text(re.compile(rf"^verified: {match['verification']['inliers']} inlier matches"))
    lines = dialog.locator("svg.inlier-lines line")
    expect(lines).to_have_count(len(match["verification"]["lines"]))
    pair = dialog.locator(".pair").bounding_box()
    side_a = dialog.locator('.side[data-side="a"] img').bounding_box()
    side_b = dialog.locator('.side[data-side="b"] img').bounding_box()
    for n in range(lines.count()):  # each line runs from a point on photo A to one on photo B
        x1, y1, x2, y2 = (float(lines.nth(n).get_attribute(k)) for k in ("x1", "y1", "x2", "y2"))
        assert side_a["x"] - 1 <= pair["x"] + x1 <= side_a["x"] + side_a["width"] + 1
        assert side_a["y"] - 1 <= pair["y"] + y1 <= side_a["y"] + side_a["height"] + 1
        assert side_b["x"] - 1 <= pair["x"] + x2 <= side_b["x"] + side_b["width"] + 1
        assert side_b["y"] - 1 <= pair["y"] + y2 <= side_b["y"] + side_b["height"] + 1
    page.screenshot(path=str(screenshots / "web-verification.png"))
    dialog.get_by_label("Verified point matches").uncheck()
    expect(lines).to_have_count(0)
    dialog.get_by_label("Verified point matches").check()
    expect(lines).to_have_count(len(match["verification"]["lines"]))
