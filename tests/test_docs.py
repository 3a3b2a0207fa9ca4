"""The documentation against the code: every fenced block marked `<!-- runnable -->` in
README.md and docs/ runs as written, and the README's links lead to a file (and heading)
that exists. (`mkdocs build --strict` in .ci/run checks the links inside docs/.)"""
import pathlib
import re
import subprocess

import pytest

from tests.conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
MARK = '<!-- runnable -->'


def runnable_blocks(text: str) -> list[list[str]]:
  """The commands of each marked block: its lines, continuations (a trailing \\) joined,
  comments and blank lines left out."""
  blocks = []
  for body in re.findall(re.escape(MARK) + r'\s*\n```[\w-]*\n(.*?)\n```', text, re.S):
    joined = re.sub(r'\\\n\s*', ' ', body)
    blocks.append([line for line in joined.splitlines()
                   if line.strip() and not line.lstrip().startswith('#')])
  return blocks


BLOCKS = [(f'{page.relative_to(ROOT)}#{i}', commands) for page in PAGES
          for i, commands in enumerate(runnable_blocks(page.read_text()))]


def test_the_pages_mark_runnable_blocks():
  assert len(BLOCKS) >= 2 and all(commands for _, commands in BLOCKS), BLOCKS


@pytest.mark.parametrize('where, commands', BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_documented_block_runs_as_written(tmp_path, where, commands):
  """From a scratch directory holding the repository's experiments and test fixtures, with a
  scratch home (so the prepared data goes there), as a reader would run them."""
  for name in ('experiments', 'tests'):
    (tmp_path / name).symlink_to(ROOT / name)
  env = command_env(HOME=str(tmp_path / 'home'))
  for command in commands:
    result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, f'{where}: {command}\n{result.stderr[-3000:]}'


def _slug(heading: str) -> str:
  """A heading's anchor as Python-Markdown's toc extension makes it (mkdocs' default)."""
  text = re.sub(r'[^\w\s-]', '', heading).strip().lower()
  return re.sub(r'[-\s]+', '-', text)


def test_the_readme_links_lead_somewhere():
  readme = (ROOT / 'README.md').read_text()
  links = re.findall(r'\]\(([^)\s]+)\)', readme)
  assert links
  for link in links:
    if link.startswith(('http://', 'https://')):
      continue
    path, _, anchor = link.partition('#')
    target = ROOT / path
    assert target.exists(), f'README.md links to {path}, which does not exist'
    if anchor:
      headings = re.findall(r'^#+\s+(.*)$', target.read_text(), re.M)
      assert anchor in {_slug(h) for h in headings}, f'README.md: no heading #{anchor} in {path}'
