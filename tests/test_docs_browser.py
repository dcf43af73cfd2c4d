"""The built site in Debian's headless Chromium: every page renders with its headings in the DOM,
and the pictures of the landing page and of a diagram page (docs/img/site-*.png) can be taken."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from bacq import docgen
from tests.test_docs_site import html_pages, parse_page

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    docgen.build_site(target)
    return target


def _rendered(page: Path) -> tuple[Path, list[str], str]:
    done = docgen.chromium("--dump-dom", page.resolve().as_uri())
    if done.returncode != 0:
        return page, [], done.stderr[-500:]
    dom = docgen.html_parser_page(done.stdout)
    return page, dom, ""


def test_every_page_renders_its_headings_in_chromium(site: Path) -> None:
    pages = html_pages(site)
    assert len(pages) >= 20
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for page, dom_headings, error in pool.map(_rendered, pages):
            name = str(page.relative_to(site))
            if error:
                problems.append(f"{name}: chromium failed: {error}")
                continue
            expected = parse_page(page).headings
            missing = [h for h in expected if h not in dom_headings]
            if not expected or missing:
                problems.append(f"{name}: headings not in the DOM: {missing or 'none at all'}")
    assert not problems, "\n".join(problems)


def test_screenshots_of_the_site_can_be_taken_and_are_checked_in(
    site: Path, tmp_path: Path
) -> None:
    made = docgen.screenshots(site, tmp_path)
    assert sorted(made) == sorted(docgen.SCREENSHOTS)
    for path in made:
        fresh = (tmp_path / path).read_bytes()
        assert fresh.startswith(PNG)
        assert len(fresh) > 20_000, f"{path} looks blank ({len(fresh)} bytes)"
        checked_in = ROOT / path
        assert checked_in.is_file(), f"{path} is missing: `python -m bacq.docgen --screenshots`"
        assert checked_in.read_bytes().startswith(PNG)
        # same size in pixels (the PNG header's width and height)
        assert checked_in.read_bytes()[16:24] == fresh[16:24], path
