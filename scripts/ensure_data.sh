#!/usr/bin/env bash
# Make sure the Fashion-MNIST IDX files named by data.dir in params.yaml exist.
# For the default Debian location, install the package dataset-fashion-mnist
# when running as root with apt-get; otherwise explain how to get the files.
set -euo pipefail

python_bin="${PYTHON:-.venv/bin/python}"
data_dir="$("$python_bin" -c 'import yaml; print(yaml.safe_load(open("params.yaml"))["data"]["dir"])')"
debian_dir="/usr/share/datasets/fashion-mnist"

if [ -f "$data_dir/train-images-idx3-ubyte.gz" ] || [ -f "$data_dir/train-images-idx3-ubyte" ]; then
    exit 0
fi

if [ "$data_dir" = "$debian_dir" ] && [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
    echo "Installing Debian package dataset-fashion-mnist into $debian_dir"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist > /dev/null
    exit 0
fi

echo "error: Fashion-MNIST not found in $data_dir (data.dir in params.yaml)." >&2
echo "Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or download" >&2
echo "the four official *-ubyte.gz files from github.com/zalandoresearch/fashion-mnist and set" >&2
echo "data.dir to their directory." >&2
exit 1
