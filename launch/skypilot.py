"""A sweep's slices as SkyPilot managed jobs (`--where skypilot`): one job per slice, each
running `launch.runner` against the sweep's queue. SkyPilot syncs the working tree (its
`workdir`, minus what .gitignore excludes) once at launch, provisions the TPU in the given
zone, and on a preemption provisions it again and reruns the job, whose runner takes back
its point and resumes it from the last checkpoint; the job, and with it the TPU, ends when
the queue has nothing left to take.
"""
import yaml

from launch import tpu


def task(slices: tpu.Slices, name: str, repo: str) -> dict:
  """The SkyPilot task (YAML as a dict) of one slice."""
  a = slices.args
  region = a.zone.rsplit('-', 1)[0]
  resources = {
      'infra': f'gcp/{region}/{a.zone}',
      'accelerators': f'tpu-{tpu.accelerator_type(a.accelerator)}',
      'accelerator_args': {'runtime_version': slices.runtime()},
      'use_spot': bool(a.spot),
      'job_recovery': {'strategy': 'FAILOVER', 'max_restarts_on_errors': 0},
  }
  runner = ['python3', '-m', 'launch.runner', f'--sweep_dir={slices.sweep_dir}',
            f'--slice={name}', '--worker=auto', f'--workers={slices.workers}',
            *slices.runner_flags]
  return {
      'name': name,
      'workdir': repo,
      'resources': resources,
      'envs': dict(kv.split('=', 1) for kv in tpu.checked_env(a.env)),
      'setup': "python3 -m pip install -q -e '.[tpu]'",
      'run': ' '.join(runner),
  }


def dump(task_dict: dict) -> str:
  return yaml.safe_dump(task_dict, sort_keys=False)


def launch_command(yaml_path: str, name: str) -> list[str]:
  return ['sky', 'jobs', 'launch', '--yes', '--name', name, yaml_path]
