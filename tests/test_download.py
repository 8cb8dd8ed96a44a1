"""Download from a CSV of URLs, against a photo server on 127.0.0.1 that also answers badly on purpose."""
import csv
import io
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.download import main as cli
from lib.core.errors import DataError
from lib.data.url_fetch import DownloadConfig, download_from_csv
from lib.data.url_list import safe_id, safe_name
from lib.data.table import index_from_folder

REPO = Path(__file__).resolve().parents[1]
# timeout well above a local answer on a busy 2-core machine; the timeout test sets its own
FAST = DownloadConfig(id_col="id", workers=4, timeout=10.0, retries=0, backoff=0.0)


def photo_bytes(seed: int, fmt: str = "JPEG", size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)  # noise, so a JPEG cut short really is missing data
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


class PhotoServer:
    """Paths: /img/NAME (a photo; /img/NAME.png is a PNG), /missing (404), /html (a web page with status 200),
    /truncated (half a JPEG, honestly declared), /short (declares the whole JPEG, sends half, hangs up),
    /slow/SECONDS/NAME (answers after that long), /flaky/N/NAME (HTTP 500 for the first N requests),
    /stall/NAME (half the photo, then silence while `stall` is set). Counts requests per path."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.version = 0  # bump to serve other bytes at the same URLs
        self.latency = 0.0
        self.stall = threading.Event()
        self.stalled = threading.Event()  # set once a stalled response has sent its first half
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # a client that gave up on a slow answer is expected here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self):
        self.counts.clear()
        self.version, self.latency = 0, 0.0
        self.stall.clear()
        self.stalled.clear()

    def photo(self, name: str) -> bytes:
        return photo_bytes(zlib.crc32(f"{name}/{self.version}".encode()), "PNG" if name.endswith(".png") else "JPEG")

    def handle(self, h: BaseHTTPRequestHandler):
        with self._lock:
            self.counts[h.path] += 1
            n = self.counts[h.path]
        time.sleep(self.latency)
        kind, *rest = h.path.strip("/").split("/")
        if kind == "missing":
            return h.send_error(404)
        if kind == "flaky" and n <= int(rest[0]):
            return h.send_error(500)
        if kind == "slow":
            time.sleep(float(rest[0]))
        body, ctype = self.photo(rest[-1]), "image/jpeg"
        if kind == "html":
            body, ctype = b"<html><body>Please log in</body></html>", "text/html"
        if kind == "truncated":
            body = body[: len(body) // 2]
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if kind == "short":
            return h.wfile.write(body[: len(body) // 2])
        if kind == "stall" and self.stall.is_set():
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            self.stalled.set()
            deadline = time.monotonic() + 10
            while self.stall.is_set() and time.monotonic() < deadline:  # the connection stays open, silent
                time.sleep(0.05)
            return
        h.wfile.write(body)


@pytest.fixture(scope="module")
def module_server():
    s = PhotoServer()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def server(module_server):
    module_server.reset()
    return module_server


def write_csv(path: Path, rows: list[list[str]], header=("url", "class", "id")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def by_line(report: pd.DataFrame) -> dict:
    return {int(r.line): r for r in report.itertuples()}


def files(root: Path) -> list[str]:
    """The files a user or the indexer sees (hidden temp files left out)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name[0] != ".")


def test_layout_loads_with_the_folder_indexer(server, tmp_path):
    u = server.url
    csv_path = write_csv(tmp_path / "urls.csv", [
        [f"{u}/img/a1", "Callithrix aurita", "M_1"],
        [f"{u}/img/a2", "Callithrix aurita", "M_1"],
        [f"{u}/img/b1.png", "Callithrix jacchus", "M2"],
        [f"{u}/img/b2?size=large", "Callithrix jacchus", "M3"],
    ])
    report = download_from_csv(csv_path, tmp_path / "data", FAST)
    assert list(report["status"]) == ["downloaded"] * 4
    index, problems = index_from_folder(tmp_path / "data")
    assert problems.empty  # the report CSV at the root is no class folder, and every name splits into ID_seq
    assert sorted(zip(index["label"], index["group"])) == [
        ("Callithrix aurita", "M-1"), ("Callithrix aurita", "M-1"),  # '_' would end the ID early: it becomes '-'
        ("Callithrix jacchus", "M2"), ("Callithrix jacchus", "M3")]
    assert index["seq"].nunique() == 4
    # the extension comes from the content: a PNG stays a PNG whatever the URL says
    assert sorted(Path(p).suffix for p in index["path"]) == [".jpg", ".jpg", ".jpg", ".png"]
    saved = pd.read_csv(tmp_path / "data" / "download_report.csv")
    assert list(saved["status"]) == ["downloaded"] * 4 and list(saved["line"]) == [2, 3, 4, 5]


def test_without_an_id_column_each_url_is_its_own_object(server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [[f"{server.url}/img/{i}", "lion"] for i in range(3)],
                         header=("url", "class"))
    download_from_csv(csv_path, tmp_path / "data", replace(FAST, id_col=""))
    index, _ = index_from_folder(tmp_path / "data")
    assert index["group"].nunique() == 3 and set(index["seq"]) == {"1"}


def test_every_failure_is_a_report_row_naming_line_and_reason(server, tmp_path):
    u = server.url
    rows = [
        [f"{u}/img/good", "a", "G1"],  # line 2
        [f"{u}/missing/x", "a", "X1"],  # 3
        [f"{u}/html/x", "a", "X2"],  # 4
        [f"{u}/truncated/x", "a", "X3"],  # 5
        [f"{u}/slow/8/x", "a", "X4"],  # 6
        [f"{u}/short/x", "a", "X5"],  # 7
        [f"{u}/img/good", "a", "G1"],  # 8: the same URL again
        [f"{u}/img/both", "a", "B1"],  # 9 and 10: one URL, two classes
        [f"{u}/img/both", "b", "B1"],
        [f"{u}/img/c", "", "C1"],  # 11
        [f"{u}/img/d", "..", "D1"],  # 12
        ["ftp://example.org/x.jpg", "a", "E1"],  # 13
        [f"{u}/img/f"],  # 14: a short line
        [f"{u}/img/g", "a", "G7", "extra"],  # 15: an unquoted comma would do this
        [f"{u}/img/z1", "a", "Z"],  # 16 and 17: one ID, two classes
        [f"{u}/img/z2", "b", "Z"],
        [f"{u}/img/h", "a", ""],  # 18
    ]
    report = download_from_csv(write_csv(tmp_path / "urls.csv", rows), tmp_path / "data", replace(FAST, timeout=3.0))
    r = by_line(report)
    assert len(report) == len(rows) and r[2].status == "downloaded"
    assert (report["status"] == "failed").sum() == len(rows) - 1
    expected = {
        3: "HTTP 404", 4: "not an image (no known image format in its content) (the server sent text/html)",
        5: "truncated or corrupt", 6: "no answer within timeout=3 s", 7: "connection broken: ",
        8: "duplicate URL: line 2 has it", 9: "URL listed under classes 'a' (line 9), 'b' (line 10)",
        10: "URL listed under classes", 11: "empty 'class' cell", 12: "class '..' cannot be a folder name",
        13: "'ftp://example.org/x.jpg' is not an http(s) URL", 14: "missing 'class' cell",
        15: "more cells than the header", 16: "ID 'Z' listed under classes 'a' (line 16), 'b' (line 17)",
        17: "ID 'Z' listed under classes", 18: "empty 'id' cell",
    }
    for line, reason in expected.items():
        assert reason in r[line].reason, (line, r[line].reason)
    half, whole = map(int, re.search(r"(\d+) of (\d+) bytes arrived", r[7].reason).groups())
    assert half == whole // 2
    # nothing half-done is left where the indexer looks, and rows that never reached the network did not ask it
    good = Path(r[2].path).relative_to(tmp_path / "data").as_posix()
    assert files(tmp_path / "data") == [good, "download_report.csv"]
    assert not any(p.name.endswith(".part") for p in (tmp_path / "data").rglob("*"))
    assert server.counts["/img/both"] == 0 and server.counts["/img/c"] == 0


def test_retries_only_what_may_pass_next_time(server, tmp_path):
    u = server.url
    csv_path = write_csv(tmp_path / "urls.csv", [
        [f"{u}/flaky/2/a", "x", "A"], [f"{u}/flaky/5/b", "x", "B"], [f"{u}/missing/c", "x", "C"]])
    report = download_from_csv(csv_path, tmp_path / "data", replace(FAST, retries=2))
    r = by_line(report)
    assert (r[2].status, r[2].attempts) == ("downloaded", 3)
    assert (r[3].status, r[3].attempts, r[3].reason) == ("failed", 3, "HTTP 500 Internal Server Error")
    assert (r[4].status, r[4].attempts) == ("failed", 1)  # a 404 says the photo is gone: asking again is no use
    assert server.counts == Counter({"/flaky/2/a": 3, "/flaky/5/b": 3, "/missing/c": 1})


def test_too_large_is_refused(server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [[f"{server.url}/img/a", "x", "A"]])
    report = download_from_csv(csv_path, tmp_path / "data", replace(FAST, max_bytes=100, retries=3))
    assert report["reason"][0].endswith("more than max_bytes=100") and report["attempts"][0] == 1


def test_second_run_fetches_only_what_is_missing(server, tmp_path):
    u = server.url
    csv_path = write_csv(tmp_path / "urls.csv",
                         [[f"{u}/img/{i}", "x", f"I{i}"] for i in range(4)] + [[f"{u}/flaky/1/f", "x", "F"]])
    first = download_from_csv(csv_path, tmp_path / "data", FAST)
    assert list(first["status"]) == ["downloaded"] * 4 + ["failed"]
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "data" / "x").iterdir()}
    server.version += 1  # the server now has other photos at the same URLs: a re-fetch would show
    second = download_from_csv(csv_path, tmp_path / "data", FAST)
    assert list(second["status"]) == ["present"] * 4 + ["downloaded"]
    assert server.counts == Counter({**{f"/img/{i}": 1 for i in range(4)}, "/flaky/1/f": 2})
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept
    third = download_from_csv(csv_path, tmp_path / "data", FAST)
    assert set(third["status"]) == {"present"} and sum(server.counts.values()) == 6


def test_an_existing_good_file_is_never_fetched_or_overwritten(server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [[f"{server.url}/img/a", "x", "A"]])
    download_from_csv(csv_path, tmp_path / "data", FAST)
    (path,) = (tmp_path / "data" / "x").iterdir()
    mine = photo_bytes(99)  # the user replaced it with a photo of their own under the same name
    path.write_bytes(mine)
    server.counts.clear()
    report = download_from_csv(csv_path, tmp_path / "data", FAST)
    assert report["status"][0] == "present" and report["path"][0] == str(path)
    assert path.read_bytes() == mine and not server.counts


def test_a_class_changed_in_the_csv_is_refused_not_duplicated(server, tmp_path):
    u = server.url
    download_from_csv(write_csv(tmp_path / "v1.csv", [[f"{u}/img/a", "x", "A"]]), tmp_path / "data", FAST)
    report = download_from_csv(write_csv(tmp_path / "v2.csv", [[f"{u}/img/a2", "y", "A"]]), tmp_path / "data", FAST)
    assert report["status"][0] == "failed" and "already downloaded under class ['x']" in report["reason"][0]
    index_from_folder(tmp_path / "data")  # still one ID in one class


def run_cli_until_stalled(server, csv_path: Path, out: Path) -> subprocess.Popen:
    """The command as a user runs it, one download at a time, caught while the 4th photo is half-way through."""
    server.stall.set()
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.download", "--csv", str(csv_path), "--out", str(out),
                             "--id-col", "id", "--workers", "1", "--timeout", "10", "--retries", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stalled.wait(60), proc.communicate(timeout=5)
    return proc


@pytest.fixture
def six_urls(server, tmp_path):
    u = server.url
    return write_csv(tmp_path / "urls.csv", [[f"{u}/img/{i}", "x", f"I{i}"] for i in range(3)]
                     + [[f"{u}/stall/{i}", "x", f"S{i}"] for i in range(3)])


def test_killed_run_keeps_finished_files_and_resumes(server, tmp_path, six_urls):
    proc = run_cli_until_stalled(server, six_urls, tmp_path / "data")
    deadline = time.monotonic() + 10
    while not list((tmp_path / "data" / "x").glob(".S0_*.part")) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the half photo is on disk, so the kill lands in the middle of a file
    proc.kill()  # no chance to clean up: what is on disk must be safe as it stands
    proc.wait(10)
    assert list((tmp_path / "data" / "x").glob(".S0_*.part"))  # hidden, so neither the indexer nor a re-run sees it
    finished = files(tmp_path / "data")
    assert len(finished) == 3 and all(f.startswith("x/I") for f in finished)
    server.stall.clear()
    report = download_from_csv(six_urls, tmp_path / "data", FAST)
    assert list(report["status"]) == ["present"] * 3 + ["downloaded"] * 3
    assert server.counts == Counter({**{f"/img/{i}": 1 for i in range(3)}, "/stall/0": 2, "/stall/1": 1,
                                     "/stall/2": 1})
    index, problems = index_from_folder(tmp_path / "data")
    assert len(index) == 6 and problems.empty


@pytest.fixture
def sigint_handled_in_children():
    """A suite started with SIGINT ignored (nohup, `make test &` without job control) hands that to every child, and
    Python then never turns Ctrl-C into KeyboardInterrupt; the test models a terminal, whose children get the default."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # exec resets a handled signal to SIG_DFL
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_writes_the_report_and_leaves_no_temp_files(server, tmp_path, six_urls, sigint_handled_in_children):
    proc = run_cli_until_stalled(server, six_urls, tmp_path / "data")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "run the same command again" in err
    report = pd.read_csv(tmp_path / "data" / "download_report.csv")
    # the photo in flight failed because of the interrupt, so it says so (and a re-run fetches it)
    assert list(report["status"]) == ["downloaded"] * 3 + ["interrupted"] * 3
    assert not any(p.name.startswith(".") for p in (tmp_path / "data").rglob("*"))


@pytest.mark.parametrize("link_mode", ["hard", "symlink", "copy"])
def test_sources_consolidate_into_one_indexable_folder(server, tmp_path, link_mode):
    u = server.url
    aurita = write_csv(tmp_path / "aurita.csv", [[f"{u}/img/a{i}", "aurita", f"A{i}"] for i in range(2)])
    jacchus = write_csv(tmp_path / "jacchus.csv", [[f"{u}/img/j0", "jacchus", "J0"], [f"{u}/img/j1", "hybrid", "A0"]])
    raw = tmp_path / "raw"
    for name, csv_path in [("aurita", aurita), ("jacchus", jacchus)]:
        config = replace(FAST, source=name, link_mode=link_mode)
        report = download_from_csv(csv_path, tmp_path / "sources", config, consolidate_dir=raw)
    # ID A0 came from aurita under another class: consolidating it would give one object two labels
    assert list(report["status"]) == ["downloaded", "failed"]
    assert "not consolidated: ID 'A0' is already under class ['aurita']" in report["reason"][1]
    assert report["source"][0] == "jacchus" and Path(report["path"][0]).parent.parent == tmp_path / "sources/jacchus"
    index, problems = index_from_folder(raw)
    assert sorted(index["label"]) == ["aurita", "aurita", "jacchus"] and problems.empty
    for rel in index["path"]:
        got, src = raw / rel, next((tmp_path / "sources").rglob(Path(rel).name))
        assert got.read_bytes() == src.read_bytes()
        assert got.is_symlink() == (link_mode == "symlink")
        assert got.samefile(src) == (link_mode != "copy")
    before = {p: p.lstat().st_mtime_ns for p in raw.rglob("*")}
    server.counts.clear()
    again = download_from_csv(aurita, tmp_path / "sources", replace(FAST, source="aurita", link_mode=link_mode),
                              consolidate_dir=raw)
    assert set(again["status"]) == {"present"} and not server.counts
    assert {p: p.lstat().st_mtime_ns for p in raw.rglob("*")} == before


def test_consolidate_folder_inside_the_download_folder_is_refused(tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [])
    with pytest.raises(DataError, match="must lie apart"):
        download_from_csv(csv_path, tmp_path / "data", DownloadConfig(source="s"), consolidate_dir=tmp_path / "data")


def test_names_become_safe_folder_names():
    assert safe_name(" Callithrix/jacchus ") == "Callithrix-jacchus"
    assert safe_name("a\\b\tc") == "a-b-c"
    assert safe_name(".hidden") == "hidden"  # a dot folder would be skipped by the indexer
    assert safe_name("a..b") == "a..b" and safe_name("saguí") == "saguí"
    for bad in ["", "  ", ".", ".."]:
        with pytest.raises(DataError, match="cannot be a folder name"):
            safe_name(bad)
    with pytest.raises(DataError, match="too long"):
        safe_name("x" * 300)
    assert safe_id("M_1/2") == "M-1-2"


def test_two_classes_that_would_share_a_folder_stop_the_run(server, tmp_path):
    u = server.url
    csv_path = write_csv(tmp_path / "urls.csv", [[f"{u}/img/a", "a/b", "A"], [f"{u}/img/b", "a-b", "B"]])
    with pytest.raises(DataError, match=r"'a/b' on line 2; 'a-b' on line 3 all become 'a-b'"):
        download_from_csv(csv_path, tmp_path / "data", FAST)
    assert not server.counts and not (tmp_path / "data").exists()


def test_cli_summary_failures_and_bad_columns(server, tmp_path, capsys):
    u = server.url
    csv_path = write_csv(tmp_path / "urls.csv", [[f"{u}/img/a", "lion"], [f"{u}/missing/b", "lion"]],
                         header=("photo", "species"))
    argv = ["--csv", str(csv_path), "--out_sources", str(tmp_path / "data"), "--source", "zoo", "--retries", "0"]
    assert cli(argv + ["--url-col", "photo", "--class-col", "species"]) == 0
    out = capsys.readouterr().out
    assert "2 rows: 1 downloaded, 0 already present, 1 failed" in out
    assert f"line 3 {u}/missing/b: HTTP 404" in out
    assert (tmp_path / "data" / "zoo" / "download_report.csv").is_file()
    assert cli(argv) == 2
    assert "no column 'url', 'class' (its columns: photo, species)" in capsys.readouterr().err
