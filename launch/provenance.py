"""What code a sweep runs: the working tree as it is (tracked and untracked files that git
does not ignore), recorded as the commit plus the diff against it, and packed for slices.

The diff is taken through a temporary index (`GIT_INDEX_FILE`), so the user's staging area
is left as it was and untracked files show up in it as added.
"""
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile

import fsspec

from lm.config import ConfigError


def _git(repo: str, *args: str, env: dict | None = None) -> str:
  return subprocess.run(['git', *args], cwd=repo, capture_output=True, text=True, check=True,
                        env={**os.environ, **(env or {})}).stdout


def repo_root(path: str = '.') -> str | None:
  """The git checkout that holds path, or None outside one."""
  try:
    return _git(path, 'rev-parse', '--show-toplevel').strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return None


def files(repo: str) -> list[str]:
  """Tracked and untracked files, not ignored ones, that exist (a deleted tracked file is
  left out), relative to the checkout."""
  listed = _git(repo, 'ls-files', '-z', '--cached', '--others', '--exclude-standard')
  return sorted({f for f in listed.split('\0') if f and os.path.isfile(os.path.join(repo, f))})


def snapshot(repo: str | None) -> dict:
  """{'commit', 'dirty', 'changed' (paths), 'diff' (text)} of the working tree against HEAD;
  outside a git checkout the commit is None."""
  if repo is None:
    return {'commit': None, 'dirty': None, 'changed': [], 'diff': ''}
  commit = _git(repo, 'rev-parse', 'HEAD').strip()
  with tempfile.TemporaryDirectory() as tmp:
    env = {'GIT_INDEX_FILE': os.path.join(tmp, 'index')}
    _git(repo, 'read-tree', 'HEAD', env=env)
    _git(repo, 'add', '--all', '.', env=env)
    diff = _git(repo, 'diff', '--cached', '--binary', 'HEAD', env=env)
    changed = _git(repo, 'diff', '--cached', '--name-only', 'HEAD', env=env).split()
  return {'commit': commit, 'dirty': bool(changed), 'changed': changed, 'diff': diff}


def record(workdir: str, snap: dict) -> None:
  """WORKDIR/provenance.json (commit, dirty, changed files, the diff's sha256) and
  WORKDIR/source.diff (the diff itself, applied to the commit with `git apply`)."""
  fs, root = fsspec.core.url_to_fs(workdir)
  root = root.rstrip('/')
  fs.makedirs(root, exist_ok=True)
  summary = {k: snap[k] for k in ('commit', 'dirty', 'changed')}
  summary['diff_sha256'] = hashlib.sha256(snap['diff'].encode()).hexdigest()
  fs.pipe_file(f'{root}/provenance.json', json.dumps(summary, indent=1).encode())
  fs.pipe_file(f'{root}/source.diff', snap['diff'].encode())


def pack(repo: str | None, target: str) -> int:
  """The working tree's files as a .tar.gz at target (local or gs://); returns their count."""
  if repo is None:
    raise ConfigError('the code shipped to the slices is the git checkout launch.sweep runs '
                      'in: run it from inside one (the working tree is shipped as it is)')
  names = files(repo)
  with tempfile.NamedTemporaryFile(suffix='.tar.gz') as tmp:
    with tarfile.open(tmp.name, 'w:gz') as tar:
      for name in names:
        tar.add(os.path.join(repo, name), arcname=name)
    fs, path = fsspec.core.url_to_fs(target)
    fs.put_file(tmp.name, path)
  return len(names)
