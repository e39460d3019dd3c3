"""`gateway classify` and tools/send_request.py against a running gateway."""
import ast
import re
import subprocess
import sys

import pytest

from gateway.tools.client import ClientError, GatewayClient

from conftest import ROOT
from helpers import CAT, CAT_LABELS


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, chelsea_jpeg, coffee_jpeg):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "chelsea.jpg").write_bytes(chelsea_jpeg)
    (folder / "coffee.jpg").write_bytes(coffee_jpeg)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def gateway_cli(capsys, *args) -> subprocess.CompletedProcess:
    """The `gateway` command in this process (what the console script calls)."""
    from gateway.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_gateway_classify_prints_image_client_lines(gateway_url, photo_files, capsys):
    proc = gateway_cli(capsys, "classify", str(photo_files / "chelsea.jpg"), str(photo_files / "coffee.jpg"),
               "--url", gateway_url, "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if not line.startswith("    ")]
    assert headers == [f"Image '{photo_files / name}':" for name in ("chelsea.jpg", "coffee.jpg")]
    blocks = proc.stdout.split("Image '")[1:]
    lines = re.findall(r"^    (\d\.\d{4}) \((\d+)\) = (.+)$", blocks[0], flags=re.M)
    assert len(lines) == 3 and int(lines[0][1]) in CAT and lines[0][2] in CAT_LABELS
    assert [float(s) for s, _, _ in lines] == sorted((float(s) for s, _, _ in lines), reverse=True)


def test_gateway_classify_reports_errors_with_a_nonzero_exit(gateway_url, photo_files, capsys):
    proc = gateway_cli(capsys, "classify", str(photo_files / "broken.jpg"), "--url", gateway_url)
    assert proc.returncode == 1 and "400 invalid_image" in proc.stderr
    proc = gateway_cli(capsys, "classify", str(photo_files / "chelsea.jpg"), "--url", gateway_url,
               "--model", "resnet")
    assert proc.returncode == 1 and "404 unknown_model" in proc.stderr


def test_send_request_prints_the_seed_format(gateway_url, photo_files):
    proc = run("tools/send_request.py", str(photo_files / "chelsea.jpg"), "--model-name", "efficientnet_lite0",
               "--url", gateway_url)
    assert proc.returncode == 0, proc.stderr
    rows = [ast.literal_eval(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 5 and all(isinstance(r, list) and len(r) == 3 for r in rows)
    score, index, label = rows[0]
    assert re.fullmatch(r"\d\.\d{3}", score) and int(index) in CAT and label in CAT_LABELS


def test_python_client_class(gateway_url, photo_files, chelsea_jpeg):
    client = GatewayClient(gateway_url)
    assert client.health() == {"status": "ok"}
    assert "efficientnet_lite0" in {m["name"] for m in client.models()["models"]}
    many = client.classify([photo_files / "coffee.jpg", chelsea_jpeg], top_k=1)
    assert len(many["results"]) == 2 and many["results"][1]["predictions"][0]["index"] in CAT
    with pytest.raises(ClientError) as info:
        client.classify(b"junk")
    assert info.value.status == 400 and info.value.code == "invalid_image"
    with pytest.raises(ClientError) as info:
        GatewayClient("http://127.0.0.1:9", timeout=2).health()
    assert info.value.status is None and info.value.code == "unreachable"
