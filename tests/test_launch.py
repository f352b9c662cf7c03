"""Launchers: the exact commands of each `--dry-run`, and one-line errors for bad input."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(module, *args):
  out = subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  return out.returncode, out.stdout.splitlines(), out.stderr


def test_local_single_process():
  rc, lines, _ = cli("local", "--config=experiments/tiny.py", "--workdir=runs/t", "--python=python",
                     "--dry-run", "--", "--config.train.steps=5")
  assert rc == 0
  assert lines == ["python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/t "
                   "--config.train.steps=5"]


def test_local_two_cpu_processes():
  rc, lines, _ = cli("local", "--config=experiments/tiny.py", "--workdir=runs/mp", "--python=python",
                     "--num_processes=2", "--platform=cpu", "--devices_per_process=4",
                     "--port=23456", "--dry-run")
  assert rc == 0
  env = ("JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={} "
         "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4")
  train = "python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/mp"
  assert lines == [
      "mkdir -p runs/mp/logs",
      f"{env.format(1)} {train} > runs/mp/logs/process_1.log 2>&1 &",
      f"{env.format(0)} {train}",
      "wait",
  ]


def test_local_gpu_processes_get_their_own_gpus():
  rc, lines, _ = cli("local", "--workdir=runs/g", "--num_processes=2", "--platform=gpu",
                     "--devices_per_process=4", "--port=1", "--dry-run")
  assert rc == 0
  assert "JAX_LOCAL_DEVICE_IDS=4,5,6,7" in lines[1] and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines[2]


def test_local_stops_the_others_when_one_process_fails(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text('#!/bin/sh\nif [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi\nexec sleep 60\n')
  fake.chmod(0o755)
  t0 = time.time()
  rc, _, err = cli("local", f"--workdir={tmp_path}/w", "--num_processes=2", f"--python={fake}")
  assert rc == 3 and time.time() - t0 < 30
  assert "error: a process exited with 3; stopping the others" in err


def test_tpu_vm_single_slice():
  rc, lines, _ = cli("tpu_vm", "--name=mm", "--zone=us-east5-a", "--accelerator_type=v5p-32", "--spot",
                     "--workdir=gs://b/run", "--actions=create,copy,setup,train,logs,delete",
                     "--dry-run", "--", "--config.train.steps=10")
  assert rc == 0
  ssh = "gcloud compute tpus tpu-vm ssh mm --zone=us-east5-a --worker=all --command="
  assert lines == [
      "gcloud compute tpus tpu-vm create mm --zone=us-east5-a --accelerator-type=v5p-32 "
      "--version=v2-alpha-tpuv5 --spot",
      "tar czf /tmp/mmfree_jax_code.tgz --exclude=.git --exclude=.venv --exclude=runs "
      "--exclude=__pycache__ .",
      "gcloud compute tpus tpu-vm scp /tmp/mmfree_jax_code.tgz mm:/tmp/mmfree_jax_code.tgz "
      "--zone=us-east5-a --worker=all",
      ssh + '"mkdir -p ~/mmfree_jax && tar xzf /tmp/mmfree_jax_code.tgz -C ~/mmfree_jax"',
      ssh + "\"cd ~/mmfree_jax && python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2'\"",
      ssh + '"cd ~/mmfree_jax && MMFREE_DISTRIBUTED=1 setsid nohup python3 -m mmfree_jax.train '
      "--config=experiments/paper.py:mmfree-1.3B --workdir=gs://b/run --config.train.steps=10 "
      '> ~/mmfree_train.log 2>&1 < /dev/null &"',
      "gcloud compute tpus tpu-vm ssh mm --zone=us-east5-a --worker=0 "
      '--command="tail -n +1 -F ~/mmfree_train.log"',
      "gcloud compute tpus tpu-vm delete mm --zone=us-east5-a --quiet",
  ]


def test_tpu_vm_multislice_uses_queued_resources_and_megascale():
  rc, lines, _ = cli("tpu_vm", "--name=ms", "--zone=z", "--project=p", "--accelerator_type=v5e-16",
                     "--num_slices=2", "--repo=https://example.com/r.git", "--workdir=gs://b/r",
                     "--actions=create,copy,train,delete", "--dry-run")
  assert rc == 0
  loc = "--zone=z --project=p"
  assert lines[0] == (f"gcloud compute tpus queued-resources create ms {loc} "
                      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite "
                      "--node-count=2 --node-prefix=ms")
  assert lines[1].startswith("until [ \"$(gcloud compute tpus queued-resources describe ms")
  assert [l.split()[5] for l in lines[2:6]] == ["ms-0", "ms-1", "ms-0", "ms-1"]  # every node
  assert "git clone --branch main https://example.com/r.git ~/mmfree_jax" in lines[2]
  coord = (f"MEGASCALE_COORDINATOR_ADDRESS=$(gcloud compute tpus tpu-vm describe ms-0 {loc} "
           "'--format=value(networkEndpoints[0].ipAddress)'):8080 MEGASCALE_NUM_SLICES=2 "
           "MEGASCALE_SLICE_ID={} MEGASCALE_PORT=8080 MMFREE_DISTRIBUTED=1 setsid nohup")
  assert coord.format(0) in lines[4] and coord.format(1) in lines[5]
  assert lines[6] == f"gcloud compute tpus queued-resources delete ms {loc} --force --quiet"


def test_tpu_vm_gcsfuse_mount_gives_a_shared_workdir():
  rc, lines, _ = cli("tpu_vm", "--name=mm", "--zone=z", "--mount_bucket=bkt", "--workdir=/mnt/bkt/r",
                     "--actions=setup,train", "--dry-run")
  assert rc == 0
  assert lines[0].endswith('&& sudo mkdir -p /mnt/bkt && sudo chown \\$USER /mnt/bkt && gcsfuse '
                           '--implicit-dirs bkt /mnt/bkt"')
  assert "--workdir=/mnt/bkt/r" in lines[1]


def test_slurm_script():
  rc, lines, _ = cli("slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--time=2:00:00",
                     "--workdir=/shared/r", "--config=experiments/paper.py:mmfree-370M", "--dry-run",
                     "--", "--config.train.steps=100")
  assert rc == 0
  assert lines == [
      "cat > mmfree.sbatch <<'EOF'",
      "#!/bin/bash",
      "#SBATCH --job-name=mmfree",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=8",
      "#SBATCH --gpus-per-node=8",
      "#SBATCH --time=2:00:00",
      "#SBATCH --output=%x-%j.out",
      "#SBATCH --partition=gpu",
      "#SBATCH --signal=TERM@300",
      "set -eo pipefail",
      "source .venv/bin/activate",
      'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
      'export JAX_COORDINATOR_ADDRESS="$head_node:12355"',
      "export JAX_NUM_PROCESSES=16",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
      "srun --kill-on-bad-exit=1 bash -c 'JAX_PROCESS_ID=$SLURM_PROCID "
      "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID exec python -m mmfree_jax.train "
      "--config=experiments/paper.py:mmfree-370M --workdir=/shared/r --config.train.steps=100'",
      "EOF",
      "sbatch mmfree.sbatch",
  ]


def test_slurm_process_per_node():
  rc, lines, _ = cli("slurm", "--nodes=3", "--gpus_per_node=4", "--process_per_node",
                     "--workdir=/shared/r", "--requeue", "--dry-run")
  assert rc == 0
  assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --requeue" in lines
  assert "export JAX_NUM_PROCESSES=3" in lines
  assert any("JAX_LOCAL_DEVICE_IDS=0,1,2,3 exec python" in l for l in lines)


@pytest.mark.parametrize("module,args,match", [
    ("local", ["--num_processes=0"], "--num_processes=0 must be >= 1"),
    ("local", ["--devices_per_process=2"], "needs --platform"),
    ("tpu_vm", ["--zone=z", "--workdir=gs://b"], "--name and --zone are required"),
    ("tpu_vm", ["--name=n", "--zone=z", "--accelerator_type=h100-8"], "not a TPU slice type"),
    ("tpu_vm", ["--name=n", "--zone=z", "--accelerator_type=v5p-32", "--workdir=runs/x"],
     "workers share: gs://BUCKET"),
    ("tpu_vm", ["--name=n", "--zone=z", "--actions=create,boot"], "unknown step"),
    ("slurm", ["--nodes=0", "--workdir=/r"], "must be >= 1"),
    ("slurm", [], "--workdir is required"),
])
def test_bad_input_is_one_line_exit_2(module, args, match):
  rc, lines, err = cli(module, *args, "--dry-run")
  assert rc == 2 and not lines
  assert err.strip().count("\n") == 0 and err.startswith("error: ") and match in err, err
