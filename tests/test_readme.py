"""Every Python block in README.md and in the documentation's pages
(``docs/pages``) runs as written.

A block runs in a fresh namespace unless its first line is a comment that
starts with ``# continues``: it then runs after the blocks it continues (the
chain of blocks of the same page up to the last one that starts fresh).
Blocks run in this process: 8 simulated CPU devices (conftest), the test
extras installed.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs" / "pages").rglob("*.md"))


def _python_blocks(page=README):
  """``(line, code)`` of every fenced python block of a page, in order."""
  text = page.read_text()
  return [(text[:m.start()].count("\n") + 1, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def _chains():
  """Each block with the blocks it continues, ids by page and line."""
  chains = []
  for page in PAGES:
    current = []
    name = page.relative_to(ROOT)
    for line, code in _python_blocks(page):
      if not code.lstrip().startswith("# continues"):
        current = []
      current = current + [(f"{name}:{line}", code)]
      chains.append(pytest.param(list(current), id=f"{name}:{line}"))
  return chains


def test_readme_and_the_guides_have_python_blocks():
  assert len(_python_blocks()) >= 4
  assert sum(len(_python_blocks(page)) for page in PAGES[1:]) >= 10


# blocks for Keras 3's JAX backend run in test_keras_layer's KERAS_BACKEND=jax
# subprocess (this process's Keras has TensorFlow's backend)
KERAS_JAX_BLOCK = "# KERAS_BACKEND=jax"


def keras_jax_blocks():
  return [(f"{page.relative_to(ROOT)}:{line}", code) for page in PAGES
          for line, code in _python_blocks(page)
          if code.lstrip().startswith(KERAS_JAX_BLOCK)]


@pytest.mark.parametrize("chain", _chains())
def test_readme_block_runs(chain):
  if chain[-1][1].lstrip().startswith(KERAS_JAX_BLOCK):
    pytest.skip("runs in test_keras_layer's KERAS_BACKEND=jax subprocess")
  namespace = {"__name__": "readme"}
  for line, code in chain:
    exec(compile(code, line, "exec"), namespace)  # noqa: S102


def _anchors(page: pathlib.Path) -> set:
  """The anchors of a page's headings, as GitHub and MkDocs slug them."""
  slugs = set()
  for heading in re.findall(r"^#{1,6} (.*)$", page.read_text(), re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    slugs.add(slug)
  return slugs


def test_readme_links_resolve():
  # README links into the documentation's pages (MkDocs checks the pages'
  # own links, in strict mode, when CI builds the site)
  links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([\w\-]+))?\)", README.read_text())
  assert len(links) >= 10
  for target, anchor in links:
    page = ROOT / target
    assert page.is_file(), target
    if anchor:
      assert anchor in _anchors(page), (target, anchor)
