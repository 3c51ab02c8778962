"""deploy/ is parsed, not trusted: its numbers must agree with the worker's defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.settings import MiB
from pipeline.workerconfig import WorkerConfig, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEFAULTS = WorkerConfig()
QUEUE = "imgpipe-jobs"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _kind(kind: str) -> dict[str, Any]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _docs(f"k8s/{path.name}"):
            if doc["kind"] == kind:
                return doc
    raise AssertionError(f"no {kind} in deploy/k8s")


def _mi(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2]) * MiB


def test_every_file_in_deploy_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"Dockerfile", "deployment.yaml", "scaledobject.yaml", "pdb.yaml"}
    for p in files:
        if p.suffix in (".yaml", ".yml"):
            assert _docs(str(p.relative_to(DEPLOY))), p
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.name not in ("Dockerfile", "README.md"):
            raise AssertionError(f"{p}: a file type this test does not check")


def test_deployment_matches_worker_defaults() -> None:
    dep = _kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    res = c["resources"]
    assert _mi(res["limits"]["memory"]) == DEFAULTS.memory_limit
    assert _mi(res["requests"]["memory"]) == DEFAULTS.memory_limit
    assert pod["terminationGracePeriodSeconds"] > DEFAULTS.grace_period + DEFAULTS.convert.cleanup_timeout / 3
    assert pod["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == DEFAULTS.metrics_port
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        DEFAULTS.metrics_port
    )
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["IMGPIPE_QUEUE_URL"].endswith(f"/{QUEUE}")
    assert c["args"][:3] == ["worker", "--config", "/etc/imgpipe/worker.toml"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/imgpipe" in mounts


def test_configmap_is_a_valid_worker_config_with_the_defaults(tmp_path: Path) -> None:
    cm = _kind("ConfigMap")
    cfg = tmp_path / "worker.toml"
    cfg.write_text(cm["data"]["worker.toml"])
    loaded = load(cfg, env={}, queue_url=f"https://sqs.eu-west-1.amazonaws.com/123456789012/{QUEUE}")
    for key in ("concurrency", "memory_limit", "visibility_timeout", "heartbeat_interval", "grace_period"):
        assert getattr(loaded, key) == getattr(DEFAULTS, key), key
    assert loaded.metrics_port == DEFAULTS.metrics_port
    [route] = loaded.routes
    cfn = _cfn()["Parameters"]
    assert route.bucket == cfn["UploadsBucketName"]["Default"]
    assert route.destination.startswith(f"s3://{cfn['ImagesBucketName']['Default']}/")


def test_keda_scales_on_the_job_queue_by_concurrency() -> None:
    so = _kind("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == _kind("Deployment")["metadata"]["name"]
    [trigger] = so["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    assert trigger["metadata"]["queueURL"].endswith(f"/{QUEUE}")
    assert int(trigger["metadata"]["queueLength"]) == DEFAULTS.concurrency
    assert trigger["metadata"]["scaleOnInFlight"] == "true"  # running jobs keep their pods
    pdb = _kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == _kind("Deployment")["spec"]["selector"]


def _cfn() -> dict[str, Any]:
    [doc] = _docs("aws/imgpipe.yaml")
    return doc


def test_aws_queues_buckets_and_policy() -> None:
    res = _cfn()["Resources"]
    q = res["JobQueue"]["Properties"]
    assert q["QueueName"] == QUEUE
    assert q["VisibilityTimeout"] == DEFAULTS.visibility_timeout
    assert DEFAULTS.heartbeat_interval <= q["VisibilityTimeout"] / 2
    assert q["ReceiveMessageWaitTimeSeconds"] == DEFAULTS.wait_time
    assert q["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    assert q["RedrivePolicy"]["maxReceiveCount"] >= 3
    # A message must be able to wait out its longest retry delay well within the retention period.
    assert q["MessageRetentionPeriod"] > DEFAULTS.retry_delay_max * q["RedrivePolicy"]["maxReceiveCount"]
    for bucket in ("UploadsBucket", "ImagesBucket"):
        [rule] = res[bucket]["Properties"]["LifecycleConfiguration"]["Rules"]
        assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
        assert rule["Status"] == "Enabled"
    [notif] = res["UploadsBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    assert notif["Event"] == "s3:ObjectCreated:*"
    assert notif["Queue"] == {"Fn::GetAtt": ["JobQueue", "Arn"]}


def test_iam_policy_is_least_privilege() -> None:
    stmts = _cfn()["Resources"]["WorkerPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    actions = {a for s in stmts for a in s["Action"]}
    assert actions == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
        "sqs:GetQueueUrl",
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:GetObjectTagging",
        "s3:PutObjectTagging",
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
    }
    for s in stmts:
        assert s["Effect"] == "Allow"
        assert "*" not in json.dumps(s["Action"])
        assert s["Resource"] != "*"
        writes = {"s3:PutObject", "s3:AbortMultipartUpload", "s3:PutObjectTagging"}
        if writes & set(s["Action"]):  # the worker writes to the images bucket only
            assert json.dumps(s["Resource"]).count("ImagesBucketName") == len(s["Resource"])


@pytest.mark.parametrize("forbidden", ["gcc", "build-essential", "qemu", "apt-get install"])
def test_container_image_is_slim_and_non_root(forbidden: str) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert forbidden not in code
    froms = [ln.split()[1] for ln in code.splitlines() if ln.startswith("FROM")]
    assert all(f.endswith("-slim") for f in froms)
    users = [ln.split()[1] for ln in code.splitlines() if ln.startswith("USER")]
    assert users
    assert users[-1] not in ("root", "0")
    assert f"EXPOSE {DEFAULTS.metrics_port}" in code
    assert 'ENTRYPOINT ["imgpipe"]' in code  # exec form: the worker is PID 1 and gets SIGTERM
