# Source on the GPU machine, from the repository root, with the .whl folder that
# benchmarks/gpu_wheels.sh filled copied along:   source benchmarks/gpu_env.sh
# Installs the carried wheels into /tmp/site (nothing from the network) and puts them and the
# project on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
python3 -c "import jax, grain, tensorflow_datasets; print('jax', jax.__version__, jax.devices())"
