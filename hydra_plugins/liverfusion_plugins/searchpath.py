"""Search ``./conf`` and ``LIVERFUSION_CONFIG_DIR`` ahead of the package's configs (``liverfusion.utils.search_path``).

Acts only when the app's main config folder is liverfusion's (its entry points, or the compose API on
``CONFIG_DIR``), so another Hydra app in the same environment is left alone.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.plugins.search_path_plugin import SearchPathPlugin


def _as_path(path: str) -> Path | None:
    if path.startswith("pkg://"):
        return None
    try:
        return Path(path.removeprefix("file://")).resolve()
    except OSError:  # pragma: no cover
        return None


class LiverfusionSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from liverfusion.utils.search_path import PACKAGE_CONF, user_config_dirs

        mains = [e for e in search_path.get_path() if e.provider == "main"]
        if not mains or _as_path(mains[0].path) != PACKAGE_CONF:
            return
        present = {_as_path(e.path) for e in search_path.get_path()}
        for folder in user_config_dirs():
            if folder not in present:
                search_path.prepend(
                    provider="liverfusion-user",
                    path=f"file://{folder}",
                    anchor=SearchPathQuery(provider="main"),
                )
