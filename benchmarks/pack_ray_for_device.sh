#!/usr/bin/env bash
# Ray Serve for a machine that cannot reach PyPI (the GPU machines here): Ray 2.60's cp312 wheel is ~80 MB, more than
# a 64 MiB working-tree transfer, so this packs Ray without the parts serving never imports (Java jars, RLlib, Data,
# Train, Tune, LLM, C++) as an xz tarball (29 MB), plus wheels of Ray Serve's own dependencies (21 MB), under .ray/
# (50 MB in all, measured 2026-12-08): with the tree and autoglm-trt's own wheels it may pass 64 MiB; then carry
# it in two calls on the same warm machine (install the wheels in one, the tarball in the next).
#   benchmarks/pack_ray_for_device.sh          (here, once; .ray/ is in .gitignore: name it in the run's carry)
#   then there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .ray/*.whl &&
#               tar -xJf .ray/ray-trim.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
py=${PY_VERSION:-3.12}
dest=.ray
rm -rf "$dest" /tmp/ray-pack && mkdir -p "$dest" /tmp/ray-pack/unpacked
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
pip download -q --only-binary=:all: --python-version "$py" --implementation cp "${plat[@]}" -d /tmp/ray-pack \
  "ray[serve]==2.60.0"
(cd /tmp/ray-pack/unpacked && unzip -q ../ray-2.60.0-*.whl)
rm -rf /tmp/ray-pack/unpacked/ray/{jars,rllib,data,train,tune,llm,cpp}
tar -C /tmp/ray-pack/unpacked -cJf "$dest/ray-trim.tar.xz" ray "$(cd /tmp/ray-pack/unpacked && ls -d ray-*.dist-info)"
rm -f /tmp/ray-pack/ray-2.60.0-*.whl
# already on the GPU image (KINDS.md's pip list), of no use to serving, or autoglm-trt's own dependencies (carried
# already for plain `serve` there: fastapi, uvicorn, pydantic, grpcio, prometheus-client, ...)
for skip in numpy- protobuf- packaging- filelock- jinja2- MarkupSafe- markupsafe- pyyaml- PyYAML- requests- urllib3- \
            certifi- charset_normalizer- idna- typing_extensions- fsspec- virtualenv- distlib- platformdirs- py_spy- \
            grpcio- grpcio_reflection- pydantic- pydantic_core- fastapi- starlette- uvicorn- prometheus_client- anyio- \
            h11- annotated_types- annotated_doc- typing_inspection- sniffio-; do
  rm -f /tmp/ray-pack/${skip}*.whl
done
cp /tmp/ray-pack/*.whl "$dest"/
du -sh "$dest"
