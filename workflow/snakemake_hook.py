"""Clear errors for config files that Snakemake itself reads (`--configfile`), before any Snakefile.

Snakemake 9.27 loads `--configfile` files before it reads the workflow, so the Snakefile cannot check
them: a missing file ends in a Python traceback (its `open` sits outside the try that would name
it) and invalid YAML in "Config file is not valid JSON or YAML" with neither file nor line. `make
install` puts a .pth file into the venv that imports this module at start-up; it wraps Snakemake's
config-file loader (only that function, once Snakemake imports it) so that both errors name the file,
the line and, for a config file this project used to ship, what replaced it.

    python -m workflow.snakemake_hook --install    # writes the .pth into this Python's site-packages
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

TARGET = "snakemake.common.configfile"
PTH_NAME = "deepspeed_diffusers_snakemake_hook.pth"


def checked_loader(load):
    def _load_configfile(configpath_or_obj, filetype="Config"):
        if isinstance(configpath_or_obj, (str, Path)) and filetype == "Config":
            from snakemake_interface_common.exceptions import WorkflowError

            from .config import ConfigError, read_config_file

            path = Path(configpath_or_obj)
            try:
                if path.suffix != ".json":
                    read_config_file(path)  # YAML: the same checks (and messages) as the stages'
                elif not path.is_file():
                    raise ConfigError(f"config file {path} does not exist")
            except ConfigError as e:
                raise WorkflowError(str(e)) from None
        return load(configpath_or_obj, filetype)

    return _load_configfile


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # the real finders find it; this one is done after
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            module._load_configfile = checked_loader(module._load_configfile)

        spec.loader.exec_module = exec_and_wrap
        return spec


def install_finder() -> None:
    if TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def write_pth() -> Path:
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    # one line, run by `site` at start-up; silent where the project is not importable
    path.write_text('import sys; exec("try:\\n import workflow.snakemake_hook as h; h.install_finder()\\nexcept ImportError: pass")\n')
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[1])
    print(f"wrote {write_pth()}")
