"""Cloud TPU slices for a sweep, through the gcloud command line.

`--slices K` slices named `<name>-0 .. <name>-K-1`, queued resources by default (`--direct`
creates TPU VMs at once, failing when there is no capacity). Nothing is started over ssh:
each slice boots with a startup script (run on every worker, again after every reboot) that
fetches the sweep's code from SWEEP/code.tar.gz, installs it, runs `launch.runner` (which
takes points from SWEEP/queue/ until none is left) and then, on worker 0, deletes its own
slice. A slice recreated after a preemption therefore picks up where its runner stopped.
"""
import argparse
import dataclasses
import shlex
import subprocess

from launch import runner
from lm.config import ConfigError
from lm.parallel import tpus

# accelerator generation (gcloud's spelling) -> TPU VM runtime (software) version
RUNTIMES = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
# zones that offer each generation (Cloud TPU's "TPU regions and zones" page, 2025)
ZONES = {
    'v4': ('us-central2-b',),
    'v5litepod': ('us-central1-a', 'us-south1-a', 'us-west1-c', 'us-west4-a', 'us-east1-c',
                  'us-east5-b', 'europe-west4-b', 'asia-southeast1-b'),
    'v5p': ('us-central1-a', 'us-east5-a', 'europe-west4-b'),
    'v6e': ('us-central1-b', 'us-east1-d', 'us-east5-a', 'us-east5-b', 'us-south1-a',
            'europe-west4-a', 'asia-northeast1-b'),
}
# states of a slice whose runner cannot be running any more: the watcher recreates it
DEAD = ('PREEMPTED', 'TERMINATED', 'FAILED', 'SUSPENDED', 'SUSPENDING', 'DELETING')
CODE = 'code.tar.gz'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group('tpu (--where tpu or skypilot)')
  group.add_argument('--name', default='lm-sweep', help='slice name prefix')
  group.add_argument('--slices', type=int, default=1, help='slices working through the queue')
  group.add_argument('--zone', default='us-central2-b', help='Google Cloud zone of the slices')
  group.add_argument('--project', default='',
                     help="Google Cloud project (default: gcloud's configured one)")
  group.add_argument('--accelerator', default='v4-8', help='e.g. v5e-8, v5p-64, v6e-16')
  group.add_argument('--runtime', default='', help='TPU software version (default: by type)')
  group.add_argument('--direct', action='store_true',
                     help='create TPU VMs directly instead of queued resources')
  group.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  group.add_argument('--reserved', action='store_true', help='from the project\'s reservation')
  group.add_argument('--valid_until', default='',
                     help='queued: give up on capacity after this long, e.g. 6h')
  group.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                     help='environment of the runs on every worker (repeatable)')


@dataclasses.dataclass
class Slices:
  """The sweep's slices and the gcloud commands that manage them."""
  args: argparse.Namespace
  sweep_dir: str
  runner_flags: list[str]

  def __post_init__(self):
    a = self.args
    if not self.sweep_dir.startswith('gs://'):
      raise ConfigError(f'--sweep_dir={self.sweep_dir}: slices cannot see local paths; use a '
                        'gs:// directory')
    self.generation = accelerator_type(a.accelerator).split('-')[0]
    if self.generation not in ZONES:
      raise ConfigError(f'--accelerator={a.accelerator!r}: unknown TPU generation (known: '
                        f'{", ".join(sorted(ZONES))})')
    if a.zone not in ZONES[self.generation]:
      raise ConfigError(f'--zone={a.zone}: {a.accelerator} is not offered there; zones with '
                        f'{self.generation}: {", ".join(ZONES[self.generation])}')
    if a.valid_until and a.direct:
      raise ConfigError('--valid_until applies to queued resources: drop --direct')
    self.workers = hosts(a.accelerator)
    self.where = [f'--zone={a.zone}'] + ([f'--project={a.project}'] if a.project else [])

  @property
  def names(self) -> list[str]:
    return [f'{self.args.name}-{i}' for i in range(self.args.slices)]


  def runtime(self) -> str:
    return self.args.runtime or RUNTIMES[self.generation]

  def startup_script(self, name: str) -> str:
    """Run by every worker at every boot: code, install, runner, then worker 0 deletes the
    slice once its runner found nothing left to take (a crashed runner starts again)."""
    env = ''.join(f'export {shlex.quote(kv)}\n' for kv in checked_env(self.args.env))
    code = f'{self.sweep_dir.rstrip("/")}/{CODE}'
    command = shlex.join(['python3', '-m', 'launch.runner', f'--sweep_dir={self.sweep_dir}',
                          f'--slice={name}', '--worker=auto', f'--workers={self.workers}',
                          *self.runner_flags])
    return (f'#!/bin/bash\n# lm sweep: slice {name}, at every boot of every worker\n'
            f'exec >> /var/log/lm-runner.log 2>&1\n{env}'
            f'mkdir -p /opt/lm && cd /opt/lm\n'
            f'until gcloud storage cp {code} {CODE}; do sleep 30; done\n'
            f'tar xzf {CODE} && python3 -m pip install -q -e \'.[tpu]\'\n'
            f'until {command}; do sleep 60; done   # a crashed runner starts again\n'
            f'worker=$(curl -s -H Metadata-Flavor:Google {runner.METADATA})\n'
            f'if [ "$worker" = 0 ]; then {shlex.join(self.delete(name))} --async; fi\n')

  def create(self, name: str, script_path: str) -> list[str]:
    a = self.args
    tpus = ['gcloud', 'compute', 'tpus']
    common = [f'--accelerator-type={accelerator_type(a.accelerator)}', *self.where,
              f'--metadata-from-file=startup-script={script_path}', '--scopes=cloud-platform',
              *(['--spot'] if a.spot else []), *(['--reserved'] if a.reserved else [])]
    if a.direct:
      return [*tpus, 'tpu-vm', 'create', name, f'--version={self.runtime()}', *common]
    return [*tpus, 'queued-resources', 'create', name, f'--node-id={name}',
            f'--runtime-version={self.runtime()}', *common,
            *([f'--valid-until-duration={a.valid_until}'] if a.valid_until else [])]

  def delete(self, name: str) -> list[str]:
    tpus = ['gcloud', 'compute', 'tpus']
    if self.args.direct:
      return [*tpus, 'tpu-vm', 'delete', name, '--quiet', *self.where]
    return [*tpus, 'queued-resources', 'delete', name, '--force', '--quiet', *self.where]

  def describe(self, name: str) -> list[str]:
    if self.args.direct:
      return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', name, *self.where,
              '--format=value(state)']
    return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', name, *self.where,
            '--format=value(state.state)']

  def upload(self, archive: str) -> list[str]:
    return ['gcloud', 'storage', 'cp', archive, f'{self.sweep_dir.rstrip("/")}/{CODE}']


class TpuFleet:
  """Slices as the watcher sees them: alive or not, (re)created, deleted."""

  def __init__(self, slices: Slices, scripts: dict[str, str]):
    self.slices, self.scripts = slices, scripts
    self.names = slices.names

  def state(self, name: str) -> str | None:
    """The slice's state as gcloud reports it, None when it does not exist."""
    result = subprocess.run(self.slices.describe(name), capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None

  def alive(self, name: str) -> bool:
    state = self.state(name)
    return state is not None and state not in DEAD

  def start(self, name: str) -> None:
    if self.state(name) is not None:   # preempted / failed: delete before creating again
      subprocess.run(self.slices.delete(name), check=True)
    print(f'creating {name}', flush=True)
    subprocess.run(self.slices.create(name, self.scripts[name]), check=True)

  def stop(self) -> None:
    for name in self.names:
      if self.state(name) is not None:
        subprocess.run(self.slices.delete(name), check=True)


def hosts(accelerator: str) -> int:
  """Hosts (workers) of a slice: v5e / v6e slices of up to 8 chips are one host."""
  try:
    topology = tpus.parse(accelerator)
  except ConfigError as e:
    raise ConfigError(str(e).replace('--topology', '--accelerator')) from None
  if not topology.spec.counts_cores and topology.chips <= 8:
    return 1
  return topology.chips // topology.spec.chips_per_host


def accelerator_type(accelerator: str) -> str:
  """gcloud's name: v5e-8 -> v5litepod-8 (others are already gcloud's names)."""
  return accelerator.replace('v5e-', 'v5litepod-')


def checked_env(assignments: list[str]) -> list[str]:
  for assignment in assignments:
    if '=' not in assignment:
      raise ConfigError(f'--env {assignment!r} must be KEY=VALUE')
  return assignments

