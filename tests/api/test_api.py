"""The REST API with FastAPI's test client: every endpoint, every bad input, auth, CORS, persistence.

A small catalogue (10 photos in 4 listings, one byte-identical copy) is indexed once with the tiny
untrained model; one dedup run gives the review queue something to show.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.catalogues import catalogue_for, edited, tiles, write_catalogue
from PIL import Image

from api import create_app
from api.settings import ApiSettings
from indexer import crud
from indexer import db as dbmod
from indexer.service import catalogue_path

N = 10
WRITE, READ = "write-secret", "read-secret"
AUTH = {"Authorization": f"Bearer {WRITE}"}
MAP_NAMES = ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height pixels, with almost no data: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def settings_for(**overrides) -> ApiSettings:
    return ApiSettings(_env_file=None, **{"api_token": WRITE, **overrides})


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("api")
    paths = write_catalogue(tmp / "photos", N)
    shutil.copy(paths[4], tmp / "photos" / "listing_3" / "copy_of_4.jpg")
    catalogue = catalogue_for(tmp, tiny_model)
    catalogue.index(tmp / "photos")
    catalogue.dedup(k=3, threshold=0.0)
    return catalogue


@pytest.fixture(scope="module")
def client(catalogue):
    with TestClient(create_app(settings_for(), catalogue=catalogue)) as test_client:
        yield test_client


@pytest.fixture()
def make_client(catalogue):
    """A client for an app with other settings (auth, CORS, limits) on the same catalogue."""
    clients = []

    def make(**overrides) -> TestClient:
        test_client = TestClient(create_app(settings_for(**overrides), catalogue=catalogue))
        clients.append(test_client)
        return test_client

    yield make
    for test_client in clients:
        test_client.close()


@pytest.fixture()
def empty(tmp_path, tiny_model):
    """A client on a catalogue with no images yet (for indexing from scratch)."""
    catalogue = catalogue_for(tmp_path, tiny_model)
    with TestClient(create_app(settings_for(), catalogue=catalogue)) as test_client:
        yield test_client, catalogue


def photos_dir(catalogue) -> Path:
    """The folder the module's catalogue was indexed from: what items' sources are relative to."""
    return Path(catalogue.data_dir).parent / "photos"


def query_bytes(n: int = 6) -> bytes:
    return jpeg(edited(tiles()[n]), quality=85)


def search(client: TestClient, data: bytes, **form) -> httpx.Response:
    return client.post("/api/search", files={"image": ("query.jpg", data, "image/jpeg")}, data=form)


# ------------------------------------------------------------------------------------ health, items


def test_health_reports_model_index_and_database(client, catalogue):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["db"]["ok"] and body["db"]["dialect"] == "sqlite"
    assert body["index"]["size"] == N + 1 and body["items"] == N + 1 and body["index"]["generation"] >= 1
    assert body["model"]["key"] == catalogue.model_key and body["model"]["input_size"] == 128
    assert body["model"]["duplicate_threshold"] == catalogue.model.duplicate_threshold
    assert body["auth"] == {"reads": "open", "writes": "token"}


def test_item_and_its_image_come_from_the_catalogue(client, catalogue):
    item = client.get("/api/items/1").json()
    assert item["id"] == 1 and item["listing"] == "listing_0" and item["embedded"]
    assert item["image_url"] == "/api/items/1/image" and item["source"] == "listing_0/photo_000.jpg"
    response = client.get(item["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (photos_dir(catalogue) / item["source"]).read_bytes()


def test_unknown_item_and_missing_file_are_404(client, catalogue):
    assert client.get("/api/items/999").status_code == 404
    assert client.get("/api/items/999/image").json()["detail"] == "no catalogue item 999"
    source = photos_dir(catalogue) / client.get("/api/items/2").json()["source"]
    moved = source.with_suffix(".away")
    source.rename(moved)
    try:
        response = client.get("/api/items/2/image")
        assert response.status_code == 404 and "missing" in response.json()["detail"]
    finally:
        moved.rename(source)


def test_responses_never_show_the_servers_paths(client, catalogue):
    """Sources are relative to the folder indexed: a client learns nothing of the server's file layout."""
    server = str(Path(catalogue.data_dir).parent)
    item = client.get("/api/items/3")
    more_like = client.post("/api/search", data={"item": 3, "k": 3, "explain": "true"})
    by_upload = search(client, query_bytes(3), k=3, explain="true")
    queue = client.get("/api/duplicates", params={"status": "all", "limit": 500})
    for response in (item, more_like, by_upload, queue):
        assert response.status_code == 200 and server not in response.text
    assert more_like.json()["query"] == item.json()["source"] == "listing_0/photo_008.jpg"
    sources = [m["source"] for m in by_upload.json()["matches"]]
    assert all(source.count("/") == 1 and source.startswith("listing_") for source in sources)


@pytest.mark.parametrize("source, origin, shown", [
    ("/srv/photos/flat 1/a.jpg", "/srv/photos", "flat 1/a.jpg"),  # a folder indexed
    ("/srv/photos/flat 1/a.jpg", "/srv/photos/list.csv", "flat 1/a.jpg"),  # a CSV: its folder
    ("/mnt/elsewhere/b.jpg", "/srv/photos/list.csv", "b.jpg"),  # a CSV row outside it: the name alone
])
def test_catalogue_paths_are_relative_to_what_was_indexed(source, origin, shown):
    assert catalogue_path(source, origin) == shown


@pytest.mark.parametrize("url", [
    "/api/items/..%2F..%2F..%2Fetc%2Fpasswd/image",
    "/api/items/1%2F..%2F..%2Fetc%2Fpasswd",
    "/api/items/-1/image",
    "/api/items/1/image?path=/etc/passwd",
    "/api/items/1/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/explanations/..%2F..%2Fetc%2Fpasswd/factual_a.png",
    "/..%2F..%2F..%2Fetc%2Fpasswd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../../../etc/passwd",
])
def test_path_traversal_never_reads_other_files(client, url):
    response = client.get(url)
    assert b"root:" not in response.content
    if "?path=" in url:  # the query parameter is ignored: the item's own file is served
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    else:
        assert response.status_code in (404, 422)


# ------------------------------------------------------------------------------------ search


def test_search_re_ranks_and_links_images(client, catalogue):
    response = search(client, query_bytes(6), k=3)
    assert response.status_code == 200
    body = response.json()
    assert body["k"] == 3 and len(body["matches"]) == 3 and body["query"] == "query.jpg"
    assert len(body["query_sha256"]) == 64 and body["threshold"] == catalogue.model.threshold
    first = body["matches"][0]
    assert first["source"] == "listing_2/photo_006.jpg" and first["rank_after"] == 1
    scores = [m["head_score"] for m in body["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert all(m["image_url"] == f"/api/items/{m['item_id']}/image" for m in body["matches"])
    assert all(m["explanation"] is None and m["overlays"] == {} and m["explanation_key"] is None for m in body["matches"])


def test_search_leaves_out_the_query_itself(client, catalogue):
    photo = next(Path(catalogue.data_dir).parent.glob("photos/*/photo_004.jpg"))
    body = search(client, photo.read_bytes(), k=2).json()
    assert len(body["excluded"]) == 2  # photo 4 and its byte-identical copy
    assert not {m["item_id"] for m in body["matches"]} & set(body["excluded"])


def test_search_explains_with_maps_and_overlay_pngs(client):
    body = search(client, query_bytes(2), k=2, explain="true").json()
    match = body["matches"][0]
    explanation = match["explanation"]
    assert explanation["decision"] in ("match", "no match") and explanation["similarity"] == pytest.approx(match["head_score"], abs=1e-4)
    for name in MAP_NAMES:
        grid = np.asarray(explanation[name])
        assert grid.ndim == 2 and grid.min() >= 0 and grid.max() <= 1
    key = match["explanation_key"]
    assert set(match["overlays"]) == set(MAP_NAMES)
    assert match["overlays"]["factual_b"] == f"/api/explanations/{key}/factual_b.png"
    for url in match["overlays"].values():
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).format == "PNG"
    heatmap_only = Image.open(io.BytesIO(client.get(match["overlays"]["factual_a"] + "?alpha=1").content))
    photo = Image.open(io.BytesIO(client.get(f"/api/explanations/{key}/image_a.png").content))
    assert heatmap_only.size == photo.size
    assert client.get(f"/api/explanations/{key}").json()["explanation_key"] == key


def test_search_names_concepts_and_measures_effects_only_when_asked(client):
    plain = search(client, query_bytes(2), k=1, explain="true").json()["matches"][0]["explanation"]
    assert isinstance(plain["correspondences"], list) and plain.get("concepts") is None and plain.get("effects") is None
    named = search(client, query_bytes(2), k=1, concepts="true").json()["matches"][0]["explanation"]
    assert isinstance(named["concepts"], list) and named.get("effects") is None


def test_search_with_a_catalogue_item(client, catalogue):
    """More like this: the item's stored embedding and description are the query; it is left out, its
    explanations are cached like an upload's and render the item's own image."""
    photo = next(Path(catalogue.data_dir).parent.glob("photos/*/photo_002.jpg"))
    by_upload = search(client, photo.read_bytes(), k=2).json()
    with catalogue.db.session() as session:
        item_id = crud.item_ids_by_source(session, [str(photo)])[str(photo)]
    response = client.post("/api/search", data={"item": item_id, "k": 2, "explain": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query_item"] == item_id and body["excluded"] == [item_id]
    assert body["query"] == photo.relative_to(photos_dir(catalogue)).as_posix()
    assert body["query_image_url"] == f"/api/items/{item_id}/image" and len(body["query_sha256"]) == 64
    assert [m["item_id"] for m in body["matches"]] == [m["item_id"] for m in by_upload["matches"]]
    match = body["matches"][0]
    assert match["explanation"]["similarity"] == pytest.approx(match["head_score"], abs=1e-4)
    rendered = client.get(f"/api/explanations/{match['explanation_key']}/image_a.png")
    assert rendered.status_code == 200 and Image.open(io.BytesIO(rendered.content)).size == Image.open(photo).size
    assert by_upload["query_item"] is None and by_upload["query_image_url"] is None


def test_search_takes_an_upload_or_an_item(client):
    both = client.post("/api/search", files={"image": ("q.jpg", query_bytes(), "image/jpeg")}, data={"item": 1})
    assert both.status_code == 422 and "exactly one of image" in both.json()["detail"]
    unknown = client.post("/api/search", data={"item": 999})
    assert unknown.status_code == 404 and unknown.json()["detail"] == "item: no catalogue item 999"
    assert client.post("/api/search", data={"item": 0}).status_code == 422


def test_unknown_explanations_are_404_and_bad_names_422(client):
    assert client.get(f"/api/explanations/{'0' * 32}/factual_a.png").status_code == 404
    assert client.get(f"/api/explanations/{'0' * 32}").status_code == 404
    assert client.get(f"/api/explanations/{'0' * 32}/passwd.png").status_code == 422
    assert client.get("/api/explanations/NOT-A-KEY/factual_a.png").status_code == 422
    assert client.get(f"/api/explanations/{'0' * 32}/factual_a.png?alpha=2").status_code == 422


def test_search_parameters_are_validated(client):
    assert search(client, query_bytes(), k=0).status_code == 422
    assert search(client, query_bytes(), k=101).status_code == 422
    assert client.post("/api/search").status_code == 422


def test_search_on_an_empty_catalogue_finds_nothing(empty):
    test_client, _ = empty
    response = search(test_client, query_bytes(), k=3, explain="true")
    assert response.status_code == 200 and response.json()["matches"] == [] and response.json()["index_size"] == 0


def test_concurrent_requests_do_not_corrupt_each_other(client):
    """Searches and compares in flight together give exactly what they give one at a time."""
    queries = [query_bytes(n) for n in (1, 3, 6, 8)]
    expected = [[(m["item_id"], round(m["head_score"], 5)) for m in search(client, q, k=3).json()["matches"]] for q in queries]
    app = client.app

    async def run() -> list[list[tuple[int, float]]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            requests = [http.post("/api/search", files={"image": ("q.jpg", q)}, data={"k": "3", "explain": "true"})
                        for q in queries * 2]
            requests.append(http.post("/api/compare", data={"item_a": "1", "item_b": "3"}))
            responses = await asyncio.gather(*requests)
        assert all(r.status_code == 200 for r in responses)
        return [[(m["item_id"], round(m["head_score"], 5)) for m in r.json()["matches"]] for r in responses[:-1]]

    assert asyncio.run(run()) == expected * 2


# ------------------------------------------------------------------------------------ compare


def test_compare_two_uploads_then_from_the_cache(client):
    files = {"image_a": ("a.jpg", jpeg(tiles()[0])), "image_b": ("b.jpg", jpeg(edited(tiles()[0])))}
    first = client.post("/api/compare", files=files)
    assert first.status_code == 200
    body = first.json()
    assert 0 < body["similarity"] < 1 and body["decision"] == ("match" if body["is_match"] else "no match")
    assert body["threshold"] == 0.5 and not body["cached"] and body["item_a"] is None
    assert all(np.asarray(body[name]).ndim == 2 for name in MAP_NAMES)
    assert body["image_a_url"].endswith("/image_a.png") and client.get(body["image_a_url"]).status_code == 200
    assert client.get(body["overlays"]["counterfactual_b"]).status_code == 200
    again = client.post("/api/compare", files=files).json()
    assert again["cached"] and again["explanation_key"] == body["explanation_key"]
    assert again["similarity"] == body["similarity"]


def test_compare_and_search_carry_the_geometric_verification(client):
    """compare verifies by default, search on request; a verified pair is a match, its lines in the photos' pixels."""
    files = {"image_a": ("a.jpg", jpeg(tiles()[1])), "image_b": ("b.jpg", jpeg(edited(tiles()[1])))}
    body = client.post("/api/compare", files=files).json()
    verification = body["verification"]
    assert verification["model"] == "homography" and verification["verified"] and verification["inliers"] >= 8
    assert body["is_match"] and body["decided_by"] in ("geometry", "head and geometry")
    assert 8 <= len(verification["lines"]) <= 30
    assert all(0 <= xa <= 150 and 0 <= ya <= 120 and 0 <= xb <= 150 and 0 <= yb <= 120
               for xa, ya, xb, yb in verification["lines"])
    unverified = client.post("/api/compare", data={"item_a": 1, "item_b": 5, "verify": "false"}).json()
    assert unverified["verification"] is None and unverified["decided_by"] == ("head" if unverified["is_match"] else None)
    different = client.post("/api/compare", data={"item_a": 1, "item_b": 5}).json()  # made again: now verified
    assert not different["cached"] and different["verification"] == {**different["verification"], "verified": False, "lines": []}

    plain = search(client, query_bytes(1), k=3, explain="true").json()
    assert all(m["verification"] is None for m in plain["matches"])
    verified = search(client, query_bytes(1), k=3, verify="true", explain="true").json()
    top, *others = verified["matches"]
    assert top["source"] == "listing_1/photo_001.jpg" and top["verification"]["verified"] and top["is_match"]
    assert top["decided_by"] in ("geometry", "head and geometry") and top["explanation"]["verification"] == top["verification"]
    assert all(not m["verification"]["verified"] and m["decided_by"] in ("head", None) for m in others)


def test_compare_catalogue_items_and_mixed(client, catalogue):
    by_items = client.post("/api/compare", data={"item_a": 1, "item_b": 5}).json()
    assert by_items["item_a"] == 1 and by_items["item_b"] == 5
    assert by_items["image_a_url"] == "/api/items/1/image" and by_items["image_b_url"] == "/api/items/5/image"
    photo = (photos_dir(catalogue) / client.get("/api/items/1").json()["source"]).read_bytes()
    mixed = client.post("/api/compare", files={"image_a": ("same.jpg", photo)}, data={"item_b": 5}).json()
    assert mixed["similarity"] == pytest.approx(by_items["similarity"], abs=1e-4)
    assert client.get(mixed["overlays"]["factual_b"]).status_code == 200


def test_optional_explanation_keys_pass_through(client, monkeypatch):
    """Keys the engine may add to an explanation (effects, concepts, ...) reach the client untouched."""
    from engine import PairExplanation

    plain = PairExplanation.to_dict
    monkeypatch.setattr(PairExplanation, "to_dict",
                        lambda self: {**plain(self), "effects": {"deletion": [0.5, 0.25]}, "newer_key": [1, 2]})
    body = client.post("/api/compare", data={"item_a": 2, "item_b": 9}).json()
    assert body["effects"] == {"deletion": [0.5, 0.25]} and body["newer_key"] == [1, 2]
    assert isinstance(body["concepts"], list) and isinstance(body["correspondences"], list)
    explained = search(client, query_bytes(3), k=1, explain="true").json()["matches"][0]["explanation"]
    assert explained["newer_key"] == [1, 2]


def test_compare_measures_effects_and_boxes_regions_in_the_original_pixels(client):
    body = client.post("/api/compare", data={"item_a": 2, "item_b": 9}).json()
    assert {"factual_a", "factual_b", "counterfactual_a", "counterfactual_b"} <= set(body["effects"])
    item_a, item_b = client.get("/api/items/2").json(), client.get("/api/items/9").json()
    for c in body["correspondences"]:
        assert c["box_a"][2] <= item_a["width"] and c["box_a"][3] <= item_a["height"]
        assert c["box_b"][2] <= item_b["width"] and c["box_b"][3] <= item_b["height"]


def test_compare_names_the_side_whose_item_file_is_missing_or_broken(client, catalogue):
    source = photos_dir(catalogue) / client.get("/api/items/2").json()["source"]
    moved = source.with_suffix(".away")
    source.rename(moved)
    try:
        missing = client.post("/api/compare", data={"item_a": 6, "item_b": 2})
        assert missing.status_code == 404 and missing.json()["detail"] == "item_b: the image file of item 2 is missing"
        source.write_bytes(b"\xff\xd8\xff" + b"\0" * 64)  # a JPEG that ends before its header does
        broken = client.post("/api/compare", data={"item_a": 2, "item_b": 6})
        assert broken.status_code == 422 and broken.json()["detail"].startswith("item_a: the image of item 2 cannot be read: ")
    finally:
        moved.replace(source)


@pytest.mark.parametrize("form, files, status", [
    ({}, {}, 422),  # nothing
    ({"item_a": "1"}, {}, 422),  # one side missing
    ({"item_a": "1", "item_b": "2"}, {"image_a": ("a.jpg", b"x")}, 422),  # a given twice
    ({"item_a": "1", "item_b": "999"}, {}, 404),
    ({"item_a": "abc", "item_b": "2"}, {}, 422),
])
def test_compare_needs_exactly_one_image_per_side(client, form, files, status):
    response = client.post("/api/compare", data=form, files=files or None)
    assert response.status_code == status


# ------------------------------------------------------------------------------------ bad input


BAD_INPUTS = {
    "text": (b"this is not an image at all\n" * 10, 415),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415),
    "empty": (b"", 400),
    "bomb": (png_header_only(50_000, 50_000), 413),
}


def _bad(name: str) -> tuple[bytes, int]:
    if name == "truncated jpeg":
        data = jpeg(tiles()[0])
        return data[: len(data) // 2], 400
    if name == "truncated png":
        data = encoded(tiles()[1], "PNG")
        return data[: len(data) // 2], 400
    if name == "corrupt png header":
        data = bytearray(encoded(tiles()[1], "PNG"))
        data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
        return bytes(data), 400
    return BAD_INPUTS[name]


BAD_NAMES = [*BAD_INPUTS, "truncated jpeg", "truncated png", "corrupt png header"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_uploads_to_search_get_the_right_status(client, name):
    data, status = _bad(name)
    response = search(client, data)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail.startswith("'query.jpg'")


@pytest.mark.parametrize("name", ["text", "empty", "bomb", "truncated jpeg"])
def test_bad_uploads_to_compare_and_index_too(client, name):
    data, status = _bad(name)
    good = jpeg(tiles()[0])
    assert client.post("/api/compare", files={"image_a": ("x.bin", data), "image_b": ("y.jpg", good)}).status_code == status
    assert client.post("/api/index", files=[("images", ("ok.jpg", good)), ("images", ("x.bin", data))],
                       headers=AUTH).status_code == status


def test_too_many_bytes_is_413(make_client):
    test_client = make_client(max_upload_bytes=20_000)
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = jpeg(Image.fromarray(big), quality=95)
    assert len(data) > 20_000
    response = search(test_client, data)
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]
    small = jpeg(tiles()[0])
    assert len(small) < 20_000 and search(test_client, small).status_code == 200


def test_oversized_request_bodies_are_refused_before_parsing(make_client):
    test_client = make_client(max_upload_bytes=10_000)
    body = b"\xff" * (3 << 20)
    declared = test_client.post("/api/search", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert declared.status_code == 413 and "request body" in declared.json()["detail"]

    def stream():
        for _ in range(3):
            yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + body

    streamed = test_client.post("/api/search", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413


def test_too_many_pixels_is_413(make_client):
    test_client = make_client(max_pixels=100_000)
    response = search(test_client, jpeg(Image.new("RGB", (400, 300), "white")))
    assert response.status_code == 413 and "120000 pixels" in response.json()["detail"]
    assert search(test_client, jpeg(Image.new("RGB", (300, 300), "white"))).status_code == 200


def test_garbled_uploads_never_crash_the_server(client):
    rng = np.random.default_rng(1)
    data = bytearray(jpeg(tiles()[5]))
    for _ in range(12):
        garbled = bytearray(data)
        for position in rng.integers(2, len(garbled), 8):
            garbled[position] = int(rng.integers(0, 256))
        cut = int(rng.integers(16, len(garbled) + 1))
        assert search(client, bytes(garbled[:cut])).status_code in (200, 400, 413, 415)


# ------------------------------------------------------------------------------------ duplicates and reviews


def test_duplicates_queue_strongest_first_and_paged(client):
    body = client.get("/api/duplicates", params={"limit": 3, "status": "all"}).json()
    assert body["run"]["id"] >= 1 and body["run"]["threshold"] == 0.0
    assert body["total"] == body["counts"]["all"] == body["run"]["n_pairs"] and len(body["pairs"]) == 3
    everything = client.get("/api/duplicates", params={"limit": 500, "status": "all"}).json()["pairs"]
    scores = [p["head_score"] for p in everything]
    assert scores == sorted(scores, reverse=True)
    assert [p["id"] for p in everything[:3]] == [p["id"] for p in body["pairs"]]
    second = client.get("/api/duplicates", params={"limit": 3, "offset": 3, "status": "all"}).json()["pairs"]
    assert [p["id"] for p in second] == [p["id"] for p in everything[3:6]]
    exact = [p for p in everything if p["exact"]]
    assert len(exact) == 1 and exact[0]["head_score"] == 1.0
    pair = everything[0]
    assert pair["item_a"]["id"] < pair["item_b"]["id"] and pair["item_a"]["image_url"].startswith("/api/items/")
    assert client.get("/api/duplicates", params={"status": "maybe"}).status_code == 422
    assert client.get("/api/duplicates", params={"run": 999}).status_code == 404


def test_groups_and_listing_report(client):
    groups = client.get("/api/duplicates/groups").json()
    assert groups["total"] >= 1 and all(len(g["items"]) == g["size"] for g in groups["groups"])
    listings = client.get("/api/duplicates/listings", params={"limit": 2}).json()
    assert listings["total"] >= 1 and len(listings["listings"]) <= 2
    share = listings["listings"][0]
    assert share["listing_a"] < share["listing_b"] and share["n_pairs"] >= 1


def test_no_dedup_run_yet_is_an_empty_queue(empty):
    test_client, _ = empty
    body = test_client.get("/api/duplicates").json()
    assert body["run"] is None and body["pairs"] == [] and body["counts"]["all"] == 0
    assert test_client.get("/api/duplicates/groups").json()["groups"] == []
    assert test_client.get("/api/duplicates/listings").json()["listings"] == []
    assert test_client.get("/api/duplicates/runs").json() == {"offset": 0, "limit": 50, "total": 0, "runs": []}


def test_reviews_move_pairs_through_the_queue(client):
    queue = client.get("/api/duplicates", params={"limit": 2}).json()
    before = queue["counts"]
    first, second = queue["pairs"]
    a, b = first["item_b"]["id"], first["item_a"]["id"]  # either order is accepted
    created = client.post("/api/reviews", json={"item_a": a, "item_b": b, "decision": "accept", "note": "same room",
                                                "reviewer": "ana"}, headers=AUTH)
    assert created.status_code == 201
    review = created.json()
    assert (review["item_a"], review["item_b"]) == (b, a) and review["reviewer"] == "ana" and review["created_at"]
    client.post("/api/reviews", json={"item_a": second["item_a"]["id"], "item_b": second["item_b"]["id"],
                                      "decision": "reject"}, headers=AUTH)
    after = client.get("/api/duplicates", params={"limit": 500}).json()
    assert after["counts"]["unreviewed"] == before["unreviewed"] - 2
    assert first["id"] not in [p["id"] for p in after["pairs"]]
    accepted = client.get("/api/duplicates", params={"status": "accepted"}).json()["pairs"]
    assert [p["id"] for p in accepted] == [first["id"]] and accepted[0]["review"]["note"] == "same room"
    # The newest review wins: rejecting it moves the pair to the rejected list.
    client.post("/api/reviews", json={"item_a": a, "item_b": b, "decision": "reject"}, headers=AUTH)
    rejected = client.get("/api/duplicates", params={"status": "rejected"}).json()
    assert {p["id"] for p in rejected["pairs"]} == {first["id"], second["id"]} and rejected["counts"]["accepted"] == 0
    listed = client.get("/api/reviews", params={"item": a}).json()
    assert listed["total"] == 2 and [r["decision"] for r in listed["reviews"]] == ["reject", "accept"]


@pytest.mark.parametrize("body, status", [
    ({"item_a": 1, "item_b": 999, "decision": "accept"}, 404),
    ({"item_a": 1, "item_b": 1, "decision": "accept"}, 422),
    ({"item_a": 1, "item_b": 2, "decision": "maybe"}, 422),
    ({"item_a": 1, "item_b": 2, "decision": "accept", "reviewer": ""}, 422),
    ({"item_a": 1, "item_b": 2, "decision": "accept", "extra": 1}, 422),
    ({"item_a": 1, "decision": "accept"}, 422),
])
def test_bad_reviews_are_refused(client, body, status):
    assert client.post("/api/reviews", json=body, headers=AUTH).status_code == status


def test_reviews_page_newest_first(client):
    for decision in ("accept", "reject", "accept"):
        client.post("/api/reviews", json={"item_a": 7, "item_b": 8, "decision": decision}, headers=AUTH)
    page = client.get("/api/reviews", params={"limit": 2, "item": 8}).json()
    assert page["total"] >= 3 and len(page["reviews"]) == 2
    ids = [r["id"] for r in page["reviews"]]
    assert ids == sorted(ids, reverse=True)
    assert client.get("/api/reviews", params={"limit": 0}).status_code == 422


def test_a_stored_review_survives_a_restart(tmp_path, tiny_model):
    write_catalogue(tmp_path / "photos", 3)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(tmp_path / "photos")
    with TestClient(create_app(settings_for(), catalogue=catalogue)) as first:
        stored = first.post("/api/reviews", json={"item_a": 1, "item_b": 3, "decision": "reject", "note": "different",
                                                  "reviewer": "bo"}, headers=AUTH).json()
    dbmod._cache.pop((catalogue.database_url, catalogue.vectors_url)).dispose()  # nothing survives in memory: a new engine on the same file
    restarted = catalogue_for(tmp_path, tiny_model)
    with TestClient(create_app(settings_for(), catalogue=restarted)) as second:
        assert second.get("/api/reviews").json()["reviews"] == [stored]


# ------------------------------------------------------------------------------------ index


def test_index_stores_uploads_and_makes_them_searchable(empty):
    test_client, catalogue = empty
    photos = [jpeg(tiles()[n]) for n in (0, 1)]
    files = [("images", ("kitchen.jpg", photos[0], "image/jpeg")), ("images", ("hall.png", encoded(tiles()[1], "PNG")))]
    response = test_client.post("/api/index", files=files, data={"listing": "flat 12/kitchen"}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"]["added"] == 2 and body["report"]["ntotal"] == 2
    stored = body["stored"]
    assert [s["filename"] for s in stored] == ["kitchen.jpg", "hall.png"]
    assert all(s["new_file"] and s["item_id"] and s["listing"] == "flat 12/kitchen" for s in stored)
    assert body["report"]["source"] == "uploads" and stored[0]["path"] == f"flat 12/kitchen/{stored[0]['sha256']}.jpg"
    path = catalogue.data_dir.resolve() / "uploads" / stored[0]["path"]
    assert path.parent == catalogue.data_dir.resolve() / "uploads" / "flat 12" / "kitchen"
    assert path.name == f"{stored[0]['sha256']}.jpg" and path.read_bytes() == photos[0]
    assert Path(stored[1]["path"]).suffix == ".png"
    assert test_client.get(stored[0]["image_url"]).content == photos[0]

    again = test_client.post("/api/index", files=files[:1], data={"listing": "flat 12/kitchen"}, headers=AUTH).json()
    assert not again["stored"][0]["new_file"] and again["report"]["added"] == 0
    assert again["stored"][0]["item_id"] == stored[0]["item_id"]

    unlisted = test_client.post("/api/index", files=[("images", ("x.jpg", jpeg(tiles()[2])))], headers=AUTH).json()
    assert unlisted["stored"][0]["listing"] is None and unlisted["report"]["ntotal"] == 3
    found = search(test_client, jpeg(edited(tiles()[1])), k=1).json()["matches"]
    assert found[0]["item_id"] == stored[1]["item_id"] and found[0]["listing"] == "flat 12/kitchen"
    assert test_client.get("/api/health").json()["index"]["size"] == 3


@pytest.mark.parametrize("listing", ["../escape", "a/../../b", ".hidden", "/absolute", "a//b", "a\\b", "x" * 200])
def test_index_refuses_listing_names_that_are_not_plain_folders(empty, listing):
    test_client, catalogue = empty
    response = test_client.post("/api/index", files=[("images", ("a.jpg", jpeg(tiles()[0])))],
                                data={"listing": listing}, headers=AUTH)
    assert response.status_code == 422
    assert not (catalogue.data_dir / "uploads").exists() or not any((catalogue.data_dir / "uploads").rglob("*.jpg"))


def test_index_refuses_formats_it_cannot_scan_and_too_many_files(empty, make_client):
    test_client, _ = empty
    gif = encoded(tiles()[0].convert("P"), "GIF")
    response = test_client.post("/api/index", files=[("images", ("a.gif", gif))], headers=AUTH)
    assert response.status_code == 415 and "GIF" in response.json()["detail"]
    limited = make_client(max_upload_files=2)
    files = [("images", (f"{n}.jpg", jpeg(tiles()[n]))) for n in range(3)]
    assert limited.post("/api/index", files=files, headers=AUTH).status_code == 413


# ------------------------------------------------------------------------------------ auth and CORS


def test_writes_need_the_write_token(client):
    review = {"item_a": 1, "item_b": 2, "decision": "accept"}
    missing = client.post("/api/reviews", json=review)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/api/reviews", json=review, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/api/reviews", json=review, headers={"Authorization": f"Basic {WRITE}"}).status_code == 401
    assert client.post(f"/api/reviews?access_token={WRITE}", json=review).status_code == 401  # never from the URL
    assert client.post("/api/index", files=[("images", ("a.jpg", jpeg(tiles()[0])))]).status_code == 401
    assert client.post("/api/reviews", json=review, headers=AUTH).status_code == 201


def test_writes_are_disabled_without_a_configured_token(make_client):
    test_client = make_client(api_token=None)
    response = test_client.post("/api/reviews", json={"item_a": 1, "item_b": 2, "decision": "accept"}, headers=AUTH)
    assert response.status_code == 403 and "WHYMATCH_API_TOKEN" in response.json()["detail"]
    assert test_client.get("/api/health").json()["auth"]["writes"] == "disabled"
    assert test_client.get("/api/reviews").status_code == 200


def test_reads_need_a_token_when_one_is_configured(make_client):
    test_client = make_client(api_read_token=READ)
    assert test_client.get("/api/health").status_code == 200  # healthchecks stay open
    assert test_client.get("/api/items/1").status_code == 401
    assert search(test_client, query_bytes()).status_code == 401
    assert test_client.post("/api/compare", data={"item_a": 1, "item_b": 2}).status_code == 401
    assert test_client.get("/api/duplicates", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for token in (READ, WRITE):
        headers = {"Authorization": f"Bearer {token}"}
        assert test_client.get("/api/items/1", headers=headers).status_code == 200
        assert test_client.get("/api/reviews", headers=headers).status_code == 200
    assert test_client.get(f"/api/items/1/image?access_token={READ}").status_code == 200  # for <img src>
    assert test_client.get("/api/items/1/image?access_token=wrong").status_code == 401
    read_write = test_client.post("/api/reviews", json={"item_a": 1, "item_b": 2, "decision": "accept"},
                                  headers={"Authorization": f"Bearer {READ}"})
    assert read_write.status_code == 403


def test_cors_is_off_unless_configured(client, make_client):
    origin = {"Origin": "https://review.example.org"}
    assert "access-control-allow-origin" not in client.get("/api/health", headers=origin).headers
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    assert "access-control-allow-origin" not in client.options("/api/reviews", headers=preflight).headers

    allowed = make_client(cors_origins="https://review.example.org, https://other.example.org")
    response = allowed.get("/api/health", headers=origin)
    assert response.headers["access-control-allow-origin"] == "https://review.example.org"
    answer = allowed.options("/api/reviews", headers=preflight)
    assert answer.status_code == 200 and "authorization" in answer.headers["access-control-allow-headers"].lower()
    stranger = allowed.get("/api/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in stranger.headers


# ------------------------------------------------------------------------------------ docs and the page


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/compare", "/api/items/{item_id}", "/api/items/{item_id}/image", "/api/duplicates",
                 "/api/reviews", "/api/index", "/api/health", "/api/explanations/{key}/{which}.png"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_the_page_is_served_at_the_root_when_present(client, catalogue, monkeypatch, tmp_path):
    from api import app as app_module

    index_html = app_module.WEB_DIR / "index.html"
    root = client.get("/")
    assert root.status_code == (200 if index_html.is_file() else 404)
    monkeypatch.setattr(app_module, "WEB_DIR", tmp_path / "no-web")
    without_page = TestClient(create_app(settings_for(), catalogue=catalogue))
    assert without_page.get("/api/health").status_code == 200 and without_page.get("/").status_code == 404
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("<!doctype html><title>whymatch</title>")
    monkeypatch.setattr(app_module, "WEB_DIR", tmp_path / "web")
    with_page = TestClient(create_app(settings_for(), catalogue=catalogue))
    assert "whymatch" in with_page.get("/").text and with_page.get("/api/health").status_code == 200
    assert with_page.get("/api/nothing-here").status_code == 404


def test_a_dedup_run_started_from_the_api_becomes_the_review_queue(client):
    """Kept last in this module: it adds a run like the fixture's (k=3, threshold 0), the latest from then on."""
    before = client.get("/api/duplicates", params={"status": "all"}).json()
    assert client.post("/api/duplicates/run", json={"k": 3, "threshold": 0.0}).status_code == 401
    both = client.post("/api/duplicates/run", json={"threshold": 0.5, "precision": 0.9}, headers=AUTH)
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    assert client.post("/api/duplicates/run", json={"k": 0}, headers=AUTH).status_code == 422
    response = client.post("/api/duplicates/run", json={"k": 3, "threshold": 0.0}, headers=AUTH)
    assert response.status_code == 201, response.text
    run = response.json()["run"]
    assert run["id"] > before["run"]["id"] and run["threshold_source"] == "given"
    after = client.get("/api/duplicates", params={"status": "all"}).json()
    assert after["run"]["id"] == run["id"] and after["counts"] == before["counts"]  # reviews carry over
    runs = client.get("/api/duplicates/runs").json()
    assert runs["total"] >= 2 and runs["runs"][0] == run and runs["runs"][1]["id"] == before["run"]["id"]  # newest first
    assert [r["id"] for r in client.get("/api/duplicates/runs", params={"offset": 1, "limit": 1}).json()["runs"]] == [before["run"]["id"]]
    older = client.get("/api/duplicates", params={"status": "all", "run": before["run"]["id"]}).json()
    assert older["run"]["id"] == before["run"]["id"] and older["total"] == before["total"]  # any run stays reachable
