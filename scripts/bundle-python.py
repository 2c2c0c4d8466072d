"""Copies the Python that runs this script into a folder a release carries beside the
port program (build-port.sh runs it with PYPORT_BUNDLE_PYTHON=1):

    python bundle-python.py DEST

DEST/lib/<libpython's soname>, DEST/lib/python3.X (the standard library and its
lib-dynload, without its test suite, IDLE, Tk, the turtle demos, the build
configuration and the base site-packages) and DEST/bin/python3. Shared objects lose
their debug sections (`strip --strip-debug`, when `strip` is there): 77 MB become 36 MB
for 3.13. The port program's
rpath looks in DEST/lib first and it takes DEST as its home (src/python.rs), so the
release runs with no Python installed on the target."""
import os
import shutil
import subprocess
import sys
import sysconfig

# top-level names of the standard library a release does not need
LEFT_OUT = {"test", "idlelib", "tkinter", "turtledemo", "site-packages", "__phello__"}


def ignore(folder, names):
    top = os.path.samefile(folder, STDLIB)
    return {
        name for name in names
        if (top and (name in LEFT_OUT or name.startswith("config-")))
        or name.endswith((".opt-1.pyc", ".opt-2.pyc"))
    }


def main(dest):
    global STDLIB
    STDLIB = sysconfig.get_path("stdlib")
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        sys.exit("pyport: %s has no shared libpython to carry" % sys.executable)
    lib = os.path.join(dest, "lib")
    os.makedirs(lib)
    shutil.copy2(os.path.join(libdir, soname), os.path.join(lib, soname))
    shutil.copytree(STDLIB, os.path.join(lib, os.path.basename(STDLIB)), ignore=ignore)
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(os.path.realpath(sys.executable), os.path.join(dest, "bin", "python3"))
    strip(dest)


def strip(dest):
    if shutil.which("strip") is None:
        return
    objects = [os.path.join(folder, name)
               for folder, _, names in os.walk(dest)
               for name in names if ".so" in name]
    subprocess.run(["strip", "--strip-debug", *objects], check=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bundle-python.py DEST")
    main(sys.argv[1])
