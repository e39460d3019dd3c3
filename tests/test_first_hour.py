"""A newcomer's mistakes get an answer in words, never a traceback (issue: the first hour)."""
import socket
import subprocess

import pytest
import yaml

from gateway.config import ConfigError, parse_config
from gateway.errors import BackendError
from gateway.service import Gateway

from conftest import ROOT, free_port


def gateway_cli(capsys, *args) -> subprocess.CompletedProcess:
    """The `gateway` command in this process (what the console script calls)."""
    from gateway.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory, chelsea_jpeg):
    folder = tmp_path_factory.mktemp("two")
    (folder / "a.jpg").write_bytes(chelsea_jpeg)
    (folder / "b.jpg").write_bytes(chelsea_jpeg)
    return folder


@pytest.mark.parametrize("out", ["missing/folder/out.jsonl", "."])
def test_batch_out_in_a_missing_folder_or_a_folder_is_a_usage_error(two_photos, tmp_path, capsys, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = gateway_cli(capsys, "batch", str(two_photos), "--out", out, "--url", f"http://127.0.0.1:{free_port()}",
                       "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.startswith("gateway batch: --out ") and "Traceback" not in proc.stderr
    assert ("does not exist" if "missing" in out else "is a folder") in proc.stderr


def test_batch_to_a_dead_gateway_writes_nothing_and_says_so(two_photos, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    proc = gateway_cli(capsys, "batch", str(two_photos), "--out", str(out), "--url", f"127.0.0.1:{free_port()}",
                       "--no-progress")
    assert proc.returncode == 1 and not out.exists()
    assert "Is `gateway serve` running there?" in proc.stderr


def test_classify_url_without_a_scheme_works(gateway_url, two_photos, capsys):
    """tritonclient's habit: host:port without http://."""
    proc = gateway_cli(capsys, "classify", str(two_photos / "a.jpg"), "--url", gateway_url.removeprefix("http://"))
    assert proc.returncode == 0, proc.stderr
    assert "cat" in proc.stdout


def test_classify_at_a_wrong_port_asks_whether_the_gateway_runs(two_photos, capsys):
    proc = gateway_cli(capsys, "classify", str(two_photos / "a.jpg"), "--url", f"localhost:{free_port()}")
    assert proc.returncode == 1
    assert "cannot reach the gateway at http://localhost:" in proc.stderr
    assert "connection refused" in proc.stderr and "Is `gateway serve` running there?" in proc.stderr
    assert "no answer unreachable" not in proc.stderr and "No connection adapters" not in proc.stderr


def test_classify_at_a_port_that_does_not_speak_http_says_so(two_photos, capsys):
    """What the V2 gRPC port looks like to an HTTP/1.1 client: bytes that are no status line."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        import threading

        def answer():
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame, as gRPC sends
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        proc = gateway_cli(capsys, "classify", str(two_photos / "a.jpg"), "--url", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert "not HTTP/1.1" in proc.stderr and "BadStatusLine" not in proc.stderr


def test_a_batch_whose_every_line_failed_exits_1(tmp_path, gateway_url, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"\xff\xd8\xff not a photo")
    proc = gateway_cli(capsys, "batch", str(folder), "--out", str(tmp_path / "out.jsonl"), "--url", gateway_url,
                       "--no-progress")
    assert proc.returncode == 1 and "2 written (2 errors)" in proc.stderr


def test_eval_without_labels_names_the_option(tmp_path, capsys):
    proc = gateway_cli(capsys, "eval", str(tmp_path), "--config", str(ROOT / "gateway.yaml"))
    assert proc.returncode == 2 and "--labels" in proc.stderr and "Traceback" not in proc.stderr


def test_a_misspelt_top_level_key_is_named_with_a_suggestion():
    data = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    data["modles"] = data.pop("models")
    with pytest.raises(ConfigError) as info:
        parse_config(data, ROOT)
    assert str(info.value).startswith("modles: unknown key (allowed: server, backends, models)")
    assert "did you mean 'models'?" in str(info.value)


def test_a_config_copied_away_from_its_models_warns_at_start_and_503_names_every_route(tmp_path, caplog):
    """gateway.yaml copied to another folder: its relative model_dir points nowhere. The start
    names each embedded route that cannot serve and why; a request's 503 lists every route tried."""
    data = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    for backend in data["backends"].values():  # no engine server answers either (whatever else runs)
        for key in ("url", "management_url"):
            if key in backend:
                backend[key] = f"http://127.0.0.1:{free_port()}"
    config = parse_config(data, tmp_path)  # relative paths now resolve under tmp_path
    gateway = Gateway(config)
    with caplog.at_level("WARNING", logger="gateway"):
        gateway.load()
    warned = [r.getMessage() for r in caplog.records]
    assert any("route embedded cannot serve" in m and "is missing; run `gateway models build`" in m for m in warned)
    photo = sorted((ROOT / "tests/data/imagenet-sample").glob("*.jpg"))[0].read_bytes()
    with pytest.raises(BackendError) as info:
        gateway.infer("efficientnet_lite0", [photo])
    body = info.value.to_dict()["error"]
    routes = [r.name for r in config.models["efficientnet_lite0"].routes]
    assert info.value.status == 503 and body["routes_tried"] == routes
    gateway.close()
