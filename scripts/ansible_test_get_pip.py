# Stands in for the get-pip.py that ansible-test downloads to bootstrap pip in
# its sanity virtual environments: that host is out of reach here, PyPI is not.
# ansible-test runs this as __main__ with pip's install arguments in sys.argv.
import subprocess
import sys

GET_PIP_ONLY_OPTIONS = ("--no-setuptools", "--no-wheel")

arguments = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", *arguments])
