"""The documentation site builds with ``mkdocs build --strict``, and every internal link of the
built HTML resolves to a built file (and anchor); the site names no outside host."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from bacq.docgen import build_site

ROOT = Path(__file__).resolve().parent.parent


class _Page(HTMLParser):
    """The links, ids and headings of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.headings: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        for name in ("href", "src"):
            if values.get(name) and tag in ("a", "img", "link", "script"):
                self.links.append(str(values[name]))
        if re.fullmatch(r"h[1-3]", tag):
            self._heading = []

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-3]", tag) and self._heading is not None:
            text = " ".join("".join(self._heading).split()).rstrip("¶").strip()
            if text:
                self.headings.append(text)
            self._heading = None


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build_site(target)  # mkdocs build --strict; raises with its output when it fails
    return target


def html_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def test_site_builds_strict_with_every_nav_page(site: Path) -> None:
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from pages(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from pages(value)

    for source in pages(config["nav"]):
        built = site / source.replace(".md", ".html")
        assert built.is_file(), f"{source} was not built"
        assert parse_page(built).headings, f"{source} has no heading"


def test_every_internal_link_resolves(site: Path) -> None:
    broken = []
    ids: dict[Path, set[str]] = {}
    for page in html_pages(site):
        for link in parse_page(page).links:
            parts = urlsplit(link)
            if parts.scheme in ("data", "mailto") or (link.startswith("#") and len(link) == 1):
                continue
            assert not parts.netloc, f"{page}: link to an outside host {link}"
            assert not parts.scheme, f"{page}: link with a scheme {link}"
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {link}")
                continue
            if parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = parse_page(target).ids
                if unquote(parts.fragment) not in ids[target]:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_site_names_no_outside_host(site: Path) -> None:
    # the pages themselves (search index and theme assets aside): no link leaves the site
    for page in html_pages(site):
        for link in parse_page(page).links:
            assert not urlsplit(link).netloc, f"{page.relative_to(site)} links to {link}"
