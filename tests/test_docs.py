"""The README and docs/: short enough to read, every link resolves inside the repository."""

import re

from conftest import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "artifacts").glob("**/report.md"))]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


def test_every_link_resolves_inside_the_repository():
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(ROOT.resolve()), f"{page.relative_to(ROOT)} links outside the repository: {target}"
            assert path.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"


def test_no_page_points_at_the_protocol_outside_the_repository():
    for page in _pages() + sorted((ROOT / "lens_iclgd").glob("*.py")):
        text = page.read_text()
        assert "../shared/PROTOCOL.md" not in text and "(PROTOCOL.md)" not in text, page.relative_to(ROOT)
