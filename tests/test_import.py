import builtins
import subprocess
import sys


def test_import_is_quiet_fast_and_patches_nothing():
    code = (
        "import builtins, sys, time\n"
        "before = set(dir(builtins)); obj_attrs = set(dir(object))\n"
        "t = time.perf_counter(); import mechscope; dt = time.perf_counter() - t\n"
        "assert set(dir(builtins)) == before and set(dir(object)) == obj_attrs\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "print(f'{dt:.4f}', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ""  # importing prints nothing
    assert float(out.stderr.strip()) < 0.5


def test_lazy_exports_resolve():
    import mechscope

    assert mechscope.Site.__name__ == "Site"
    assert callable(mechscope.hooked) and callable(mechscope.run)
    assert not hasattr(builtins, "save")
