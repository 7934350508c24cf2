"""Cluster detection from the environment (explicit, SLURM, Kubernetes), its error messages, and the launch files."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from small4_jax.parallel.distributed import ClusterSpec, DistributedError, detect, expand_nodelist

REPO = Path(__file__).resolve().parent.parent
SBATCH = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))


def test_single_process_by_default():
    assert detect({}) == ClusterSpec(None, 1, 0, 1, "single")


def test_explicit_variables():
    env = {"SMALL4_COORDINATOR": "10.0.0.5:1234", "SMALL4_NUM_PROCESSES": "4", "SMALL4_PROCESS_ID": "3",
           "SMALL4_NUM_HOSTS": "2", "SMALL4_LOCAL_DEVICE_IDS": "0,1,2,3"}
    assert detect(env) == ClusterSpec("10.0.0.5:1234", 4, 3, 2, "explicit", (0, 1, 2, 3))
    local = {"SMALL4_COORDINATOR": "127.0.0.1:99", "SMALL4_NUM_PROCESSES": "2", "SMALL4_PROCESS_ID": "1"}
    assert detect(local).multi_process  # loopback is fine on one host


def test_slurm():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_JOB_NODELIST": "gpu[07-09],login2"}
    assert detect(env) == ClusterSpec("gpu07:12321", 4, 2, 4, "slurm")
    assert detect(dict(env, SMALL4_COORDINATOR_PORT="4000")).coordinator == "gpu07:4000"
    assert expand_nodelist("a[1-3,10],b,c[08-09]") == ["a1", "a2", "a3", "a10", "b", "c08", "c09"]


def test_kubernetes_indexed_job():
    env = {"JOB_COMPLETION_INDEX": "1", "SMALL4_NUM_PROCESSES": "2", "JOBSET_NAME": "ft", "REPLICATED_JOB_NAME": "w"}
    assert detect(env) == ClusterSpec("ft-w-0-0.ft:12321", 2, 1, 2, "kubernetes")


@pytest.mark.parametrize("env,message", [
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
      "SMALL4_COORDINATOR": "127.0.0.1:5000"},
     "SLURM: coordinator 127.0.0.1:5000 is a loopback address but the job spans 2 hosts"),
    ({"SMALL4_COORDINATOR": "localhost:5000", "SMALL4_NUM_PROCESSES": "4", "SMALL4_PROCESS_ID": "0",
      "SMALL4_NUM_HOSTS": "2"}, "SMALL4_*: coordinator localhost:5000 is a loopback address but the job spans 2 hosts"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
      "SLURM_JOB_NODELIST": "n[1-2]"}, "SLURM_NTASKS=4 but SLURM_NNODES=2 x SLURM_NTASKS_PER_NODE=1 = 2"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-3]"},
     "SLURM_NNODES=2 but the node list 'n[1-3]' has 3 hosts"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1", "SMALL4_NUM_PROCESSES": "3"},
     "SMALL4_NUM_PROCESSES=3 but SLURM_NTASKS=2: the counts disagree"),
    ({"SMALL4_COORDINATOR": "h:1", "SMALL4_NUM_PROCESSES": "2", "SMALL4_PROCESS_ID": "2"},
     "SMALL4_*: process id 2 is outside [0, 2)"),
    ({"SMALL4_COORDINATOR": "h", "SMALL4_NUM_PROCESSES": "2", "SMALL4_PROCESS_ID": "0"},
     "SMALL4_*: coordinator 'h' is not host:port"),
    ({"SMALL4_NUM_PROCESSES": "2", "SMALL4_PROCESS_ID": "0"},
     "SMALL4_PROCESS_ID is set: SMALL4_NUM_PROCESSES and SMALL4_COORDINATOR are needed too"),
    ({"SMALL4_NUM_PROCESSES": "2"}, "SMALL4_NUM_PROCESSES=2 but no SMALL4_PROCESS_ID"),
    ({"JOB_COMPLETION_INDEX": "0"}, "set SMALL4_NUM_PROCESSES to the number of pods"),
    ({"SMALL4_COORDINATOR": "h:1", "SMALL4_NUM_PROCESSES": "two", "SMALL4_PROCESS_ID": "0"},
     "SMALL4_NUM_PROCESSES='two': expected an integer"),
])
def test_bad_settings_are_clear_errors(env, message):
    with pytest.raises(DistributedError) as e:
        detect(env)
    assert message in str(e.value)


@pytest.mark.parametrize("script", SBATCH, ids=[p.name for p in SBATCH])
def test_sbatch_scripts_parse_and_document_their_variables(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    text = script.read_text()
    header = text.split("set -euo pipefail")[0]
    for var in set(re.findall(r"\$\{?(SMALL4_[A-Z_]+)", text)):
        assert var in header, f"{script.name} uses {var} without documenting it"


def test_jobset_is_a_valid_indexed_jobset():
    doc = yaml.safe_load((REPO / "launch" / "k8s" / "jobset-finetune.yaml").read_text())
    assert doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    assert int(env["SMALL4_NUM_PROCESSES"]) == job["parallelism"] == job["completions"]
    spec = detect({**env, "JOB_COMPLETION_INDEX": "1"})
    assert spec.coordinator.startswith(f"{doc['metadata']['name']}-workers-0-0.")
