"""mkdocs hook: the config reference page's table, written at build time from
`lm/config/base.py` (`lm.config.reference.markdown()`), so that it cannot drift."""
MARKER = '<!-- the config reference: written here by docs/hooks/config_reference.py -->'


def on_page_markdown(markdown: str, page, **_) -> str:
  if MARKER not in markdown:
    return markdown
  from lm.config import reference
  return markdown.replace(MARKER, reference.markdown())
