"""Cloud TPU VMs for sweep points, through the gcloud command line.

Every point gets a TPU VM (or a queued resource) of its own, named `<name>-<i>`; the project
is copied there as a `git archive` of HEAD and installed with `pip install -e '.[tpu]'`, and
the point's `python -m lm.main` starts on every worker of the slice (`--worker=all`; on a
pod slice JAX joins the hosts by itself). Workdirs should be on GCS (gs://...), so that a
preempted point resumes from its last checkpoint when the sweep is launched again.
"""
import argparse
import dataclasses
import shlex
import shutil
import subprocess
import time

REMOTE_DIR = '~/lm'
ARCHIVE = '/tmp/lm-project.tar.gz'
# accelerator generation -> TPU VM runtime (software) version
RUNTIMES = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}


@dataclasses.dataclass
class Plan:
  name: str            # the TPU VM / queued resource
  workdir: str
  command: list[str]   # python -m lm.main ..., run on every worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group('tpu')
  group.add_argument('--name', default='lm-sweep', help='TPU VM name prefix')
  group.add_argument('--zone', default='us-central2-b')
  group.add_argument('--project', default='')
  group.add_argument('--accelerator', default='v5e-8', help='e.g. v5e-8, v5p-64, v6e-16')
  group.add_argument('--runtime', default='', help='TPU software version (default: by type)')
  group.add_argument('--queued', action='store_true', help='use queued resources')
  group.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  group.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                     help='environment of the run on every worker (repeatable)')


def accelerator_type(accelerator: str) -> str:
  """gcloud's name: v5e-8 -> v5litepod-8 (others are already gcloud's names)."""
  return accelerator.replace('v5e-', 'v5litepod-')


def _runtime(args) -> str:
  if args.runtime:
    return args.runtime
  generation = accelerator_type(args.accelerator).split('-')[0]
  if generation not in RUNTIMES:
    raise ValueError(f'--accelerator={args.accelerator!r}: unknown TPU generation; pass --runtime')
  return RUNTIMES[generation]


def commands(plan: Plan, args) -> dict[str, list[str]]:
  """The gcloud commands of one point, by purpose."""
  tpus = ['gcloud', 'compute', 'tpus']
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  spot = ['--spot'] if args.spot else []
  accelerator = f'--accelerator-type={accelerator_type(args.accelerator)}'
  if args.queued:
    create = [*tpus, 'queued-resources', 'create', plan.name, f'--node-id={plan.name}',
              accelerator, f'--runtime-version={_runtime(args)}', *where, *spot]
    delete = [*tpus, 'queued-resources', 'delete', plan.name, '--force', '--quiet', *where]
  else:
    create = [*tpus, 'tpu-vm', 'create', plan.name, accelerator, f'--version={_runtime(args)}',
              *where, *spot]
    delete = [*tpus, 'tpu-vm', 'delete', plan.name, '--quiet', *where]
  ssh = [*tpus, 'tpu-vm', 'ssh', plan.name, '--worker=all', *where]
  log = f'~/{plan.name}.log'
  return {
      'exists': [*tpus, 'tpu-vm', 'describe', plan.name, *where, '--format=value(state)'],
      'create': create,
      'archive': ['git', 'archive', '--format=tar.gz', '-o', ARCHIVE, 'HEAD'],
      'copy': [*tpus, 'tpu-vm', 'scp', ARCHIVE, f'{plan.name}:{ARCHIVE}', '--worker=all',
               *where],
      'install': [*ssh, f'--command=mkdir -p {REMOTE_DIR} && tar xzf {ARCHIVE} -C {REMOTE_DIR}'
                  f" && cd {REMOTE_DIR} && pip install -q -e '.[tpu]'"],
      'run': [*ssh, f'--command=cd {REMOTE_DIR} && nohup '
              f'{shlex.join([*_env_prefix(args.env), *plan.command])} > {log} 2>&1 &'],
      'delete': delete,
  }


def _env_prefix(assignments: list[str]) -> list[str]:
  for assignment in assignments:
    if '=' not in assignment:
      raise ValueError(f'--env {assignment!r} must be KEY=VALUE')
  return ['env', *assignments] if assignments else []


def run(plans: list[Plan], args, delete: bool, dry_run: bool) -> int:
  """Creates (or reuses) each point's TPU, installs the project and starts the point; or
  deletes the TPUs. With dry_run, prints every command instead."""
  if not dry_run and shutil.which('gcloud') is None:
    print('error: gcloud not found: install the Google Cloud SDK and run `gcloud auth login` '
          '(--dry-run prints the commands without it)')
    return 2
  for plan in plans:
    steps = commands(plan, args)
    order = ['delete'] if delete else ['exists', 'create', 'archive', 'copy', 'install', 'run']
    for purpose in order:
      command = steps[purpose]
      if dry_run:
        print(shlex.join(command))
        continue
      if purpose == 'exists':
        if subprocess.run(command, capture_output=True).returncode == 0:
          order.remove('create')   # reuse the TPU VM that is already there
        continue
      subprocess.run(command, check=True)
      if purpose == 'create' and args.queued:
        _wait_active(plan, args)
  if not delete:
    for plan in plans:
      print(f'{plan.workdir}  on  {plan.name} ({args.accelerator}, {args.zone}); log ~/'
            f'{plan.name}.log on worker 0')
  return 0


def _wait_active(plan: Plan, args, poll_s: float = 30.0) -> None:
  describe = ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', plan.name,
              f'--zone={args.zone}', '--format=value(state.state)']
  while subprocess.run(describe, capture_output=True, text=True).stdout.strip() != 'ACTIVE':
    time.sleep(poll_s)
