"""deploy/prometheus and deploy/grafana against a real Prometheus (Debian's package, installed by
`make setup`): promtool checks the config and the rules and runs the rules' unit tests; then a
Prometheus of the test's own (a free loopback port, a temporary store, scraping every second)
scrapes a real `gateway serve` under a little load, and every dashboard query and every rule's
expression must answer with data. A renamed metric leaves a query empty and fails its test.

Queries over admission control's metrics (gateway_in_flight, gateway_queued,
gateway_queue_wait_seconds, gateway_rejected_total) are skipped, saying so, while the gateway
does not export them; everything else must pass.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from gateway.config import ModelSettings
from gateway.tools.local_gateway import free_port

from conftest import ROOT, load_yaml_config

PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml"
MODEL = "efficientnet_lite0"
ADMISSION = ("gateway_in_flight", "gateway_queued", "gateway_queue_wait_seconds", "gateway_rejected_total")
# Grafana's variables, as the dashboard's defaults would fill them in
VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
TEST_LABELS = {"namespace": "gateway-test", "pod": "gateway-0"}  # what the Kubernetes job adds

needs_prometheus = pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                                      reason="Prometheus is not installed (`make setup` installs Debian's package)")


# -- what the files ask of Prometheus ------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression) of every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{panel['title']} / {target['refId']}", target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def measured(expr: str) -> str:
    """An alert's expression without its threshold: ``series OP number`` -> ``series``. Alerts
    are written that way (alerts.yml says so) so their series can be checked while nothing fires."""
    depth, quote, cut = 0, "", None
    for i, ch in enumerate(expr):
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in "<>=!" and expr[i:i + 2] not in ("=~", "!~"):
            cut = i if cut is None else cut
    assert cut is not None and re.fullmatch(r"\s*(==|!=|>=|<=|>|<)\s*[\d.e+-]+\s*", expr[cut:]), \
        f"not `series OP number`: {expr}"
    assert not re.search(r"\b(and|or|unless)\b", expr[:cut]), expr
    return expr[:cut].strip()


def filled(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def adapter_query() -> str:
    """The Prometheus adapter's query for the HPA's gateway_in_flight, as the adapter fills it in for
    one pod (deploy/k8s/prometheus-adapter/values.yaml)."""
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
    matchers = ",".join(f'{k}="{v}"' for k, v in TEST_LABELS.items())
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


QUERIES = ([pytest.param(filled(e), id=f"panel: {t}") for t, e in dashboard_queries()]
           + [pytest.param(r["expr"], id=f"record: {r['record']}") for r in rules() if "record" in r]
           + [pytest.param(r["record"], id=f"recorded: {r['record']}") for r in rules() if "record" in r]
           + [pytest.param(measured(r["expr"]), id=f"alert: {r['alert']}") for r in rules() if "alert" in r]
           + [pytest.param(adapter_query(), id="prometheus-adapter: gateway_in_flight")])


# -- promtool ------------------------------------------------------------------------------------
def promtool(*args: str) -> str:
    done = subprocess.run(["promtool", *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@needs_prometheus
def test_promtool_checks_config_and_rules():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    out = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(rules())} rules found" in out


@needs_prometheus
def test_promtool_rule_unit_tests_cover_every_alert():
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    tested = {case["alertname"] for test in yaml.safe_load((PROM_DIR / "alerts.test.yml").read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert tested == {r["alert"] for r in rules() if "alert" in r}


def test_every_alert_is_a_series_against_a_threshold_with_severity_and_summary():
    for rule in rules():
        if "alert" in rule:
            assert measured(rule["expr"]) and rule["labels"]["severity"] in ("warning", "critical"), rule
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and variables["model"]["allValue"] == ".*"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    used = " ".join(e for _, e in dashboard_queries())
    for name in ("gateway_requests_total", "gateway_images_total", "gateway_request_latency_seconds_bucket",
                 "gateway_inference_latency_seconds_bucket", "gateway_breaker_open", "gateway_route_ready",
                 *ADMISSION[:3], "gateway_rejected_total"):
        assert name in used, name


# -- a real Prometheus scraping a real gateway -------------------------------------------------------
class Prometheus:
    def __init__(self, target: str, workdir: Path):
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        config.pop("alerting")  # no Alertmanager here
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gateway"]
        job.update(scrape_interval="1s", scrape_timeout="1s",
                   static_configs=[{"targets": [target], "labels": TEST_LABELS}])
        config["scrape_configs"] = [job]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (written until stop)
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.workdir = workdir
        self.wait(lambda: requests.get(self.url + "/-/ready", timeout=1).ok, "ready")

    def query(self, expr: str) -> list:
        answer = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def wait(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
            try:
                if condition():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        pytest.fail(f"Prometheus: not {what} after {timeout:g} s; log: "
                    f"{(self.workdir / 'prometheus.log').read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def load_config_for_scrape() -> dict:
    """gateway.yaml with one model on the embedded engine and a Triton route to a closed port
    (503s, an open breaker, an engine down), admission bounds small enough to refuse a burst."""
    config = load_yaml_config()
    config["backends"] = {"embedded": config["backends"]["embedded"],
                          "triton": {**config["backends"]["triton"], "url": f"http://127.0.0.1:{free_port()}",
                                     "connect_timeout_s": 1}}
    model = config["models"][MODEL]
    model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded"
                       or (r["backend"] == "triton" and r.get("name") is None)]
    if "max_in_flight" in ModelSettings.model_fields:  # admission control, once it has landed
        model.update(max_in_flight=1, max_queued=1)
    config["models"] = {MODEL: model}
    return config


def put_load(url: str, grpc_port: int, photo: bytes) -> None:
    """A little of everything the dashboard shows: answers, client errors, engine failures (the
    Triton route is down), V2 over REST and gRPC, and a burst over the admission bounds."""
    import tritonclient.grpc as grpcclient

    jpeg = {"Content-Type": "image/jpeg"}
    for _ in range(8):
        assert requests.post(f"{url}/v1/classify", data=photo, headers=jpeg, timeout=60).status_code == 200
    for _ in range(3):
        assert requests.post(f"{url}/v1/classify", data=b"\xff\xd8 no", headers=jpeg, timeout=60).status_code == 400
        assert requests.post(f"{url}/v1/classify?route=triton", data=photo, headers=jpeg, timeout=60).status_code == 503
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[photo]], dtype=object))
    for _ in range(3):
        assert client.infer(f"{MODEL}_image", [tensor]).get_response().model_version == "embedded"
    with pytest.raises(Exception, match="unknown model"):
        client.infer("nope", [tensor])
    with ThreadPoolExecutor(16) as pool:  # over max_in_flight=1 + max_queued=1: some wait, some are refused
        codes = list(pool.map(lambda _: requests.post(f"{url}/v1/classify", data=photo, headers=jpeg,
                                                      timeout=60).status_code, range(16)))
    assert set(codes) <= {200, 429}, codes


@pytest.fixture(scope="module")
def scraped(start_gateway, chelsea_jpeg, tmp_path_factory):
    """(Prometheus, the gateway's /metrics text) once the load has been scraped."""
    if not shutil.which("prometheus"):
        pytest.skip("Prometheus is not installed (`make setup` installs Debian's package)")
    grpc_port = free_port()
    url = start_gateway(load_config_for_scrape(), workers=2, grpc_port=grpc_port)
    prometheus = Prometheus(url.removeprefix("http://"), tmp_path_factory.mktemp("prometheus"))
    try:
        prometheus.wait(lambda: [s["value"][1] for s in prometheus.query('up{job="gateway"}')] == ["1"], "scraping")
        put_load(url, grpc_port, chelsea_jpeg)
        exported = requests.get(url + "/metrics", timeout=30).text
        # the load's last samples scraped, and the recording rules evaluated over them
        total = sum(float(s["value"][1]) for s in prometheus.query(f'gateway_requests_total{{model="{MODEL}"}}'))
        sent = sum(float(v) for v in re.findall(rf'^gateway_requests_total{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$',
                                                exported, re.M))
        prometheus.wait(lambda: sum(float(s["value"][1]) for s in prometheus.query(
            f'gateway_requests_total{{model="{MODEL}"}}')) >= sent, f"scraped the load ({total} of {sent})")
        prometheus.wait(lambda: prometheus.query("model:gateway_request_errors:ratio_rate5m"), "recording")
        time.sleep(2)  # a few more scrapes and rule evaluations
        yield prometheus, exported
    finally:
        prometheus.stop()


def exported_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*?)(?:_bucket|_count|_sum|_created)?[{ ]", text, re.M)}


@needs_prometheus
@pytest.mark.parametrize("expr", QUERIES)
def test_query_answers_with_data(scraped, expr):
    prometheus, exported = scraped
    missing = [m for m in ADMISSION if re.search(rf"\b{m}(_bucket)?\b", expr) and m not in exported_names(exported)]
    if missing:
        pytest.skip(f"admission control has not landed: the gateway does not export {', '.join(missing)}")
    result = prometheus.query(expr)
    assert result, f"no data for {expr!r}; the gateway exports {sorted(n for n in exported_names(exported))}"


@needs_prometheus
def test_rules_evaluate_without_errors(scraped):
    prometheus, _ = scraped
    groups = requests.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(evaluated) == {r.get("record") or r["alert"] for r in rules()}
    for name, rule in evaluated.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)


@needs_prometheus
def test_dashboard_model_variable_lists_the_model(scraped):
    prometheus, _ = scraped
    answer = requests.get(prometheus.url + "/api/v1/label/model/values",
                          params={"match[]": "gateway_requests_total"}, timeout=10).json()
    assert MODEL in answer["data"]


@needs_prometheus
def test_the_load_shows_as_it_happened(scraped):
    """Not only data: the right data (the engine down, its breaker open, the embedded route ready)."""
    prometheus, _ = scraped

    def value(expr: str) -> dict:
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in prometheus.query(expr)}

    assert value('max by (backend) (gateway_route_ready)') == {(("backend", "embedded"),): 1.0,
                                                               (("backend", "triton"),): 0.0}
    assert value('max by (route) (gateway_breaker_open)') == {(("route", "embedded"),): 0.0,
                                                             (("route", "triton"),): 1.0}
    assert value(f'sum(gateway_requests_total{{model="{MODEL}", backend="triton", status="503"}})') == {(): 3.0}
    assert value("sum(gateway_grpc_responses_total)")[()] >= 4
