"""The files the WebUI runs itself: install.py and the scripts/ entry."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install(env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def test_install_py_installs_nothing_and_reports_extras(tmp_path):
    source = open(os.path.join(ROOT, "install.py"), encoding="utf-8").read()
    assert "pip" not in source and "subprocess" not in source
    out = _install()
    assert out.returncode == 0 and out.stderr == ""
    for pkg in ("prodigyopt", "bitsandbytes"):
        if importlib.util.find_spec(pkg) is None:
            assert pkg in out.stdout
    (tmp_path / "prodigyopt.py").write_text("raise RuntimeError('install.py must not import extras')\n")
    (tmp_path / "bitsandbytes.py").write_text("raise RuntimeError('install.py must not import extras')\n")
    out = _install({"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


def test_scripts_entry_loads_like_the_webui_loads_it():
    # A1111: the extension folder is put first on sys.path while the file is imported by path
    path = os.path.join(ROOT, "scripts", "charlora.py")
    old = list(sys.path)
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location("charlora.py", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = old
    assert "lib_charlora" in sys.modules


def test_webui_start_imports_nothing_heavy():
    # what loading scripts/charlora.py and building the tab import, in a fresh process that has what the
    # WebUI has by then (timings: benchmarks/startup.py; here only which modules)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import startup
    finally:
        sys.path.pop(0)
    r = startup.measure()
    assert sorted(r["script_modules"]) == ["lib_charlora", "lib_charlora.webui"]  # the script: two small modules
    heavy = [m for m in r["script_modules"] + r["tab_modules"] if m.split(".")[0] in startup.HEAVY]
    assert heavy == [], heavy
    assert "lib_charlora.ui" in r["tab_modules"]  # the tab was built
