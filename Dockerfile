# socks6fast in a container (issue 14 item 5). Build and run:
#   docker build -t socks6fast .
#   docker run --rm -p 1080:1080/tcp -p 1080:1080/udp \
#       -v "$PWD/proxy.toml:/etc/socks6fast/socks6fast.toml:ro" \
#       socks6fast serve --config /etc/socks6fast/socks6fast.toml
# Without a config the built-in default applies, as outside a container: it listens on
# 127.0.0.1:1080 *inside the container*, which nothing outside it reaches. To publish the
# port, give a config that listens on "0.0.0.0:1080" together with [users] and [[rules]]
# that keep strangers out (serve warns about an open proxy otherwise); see README.md,
# "Docker".

# Build stage: a C compiler for the Cython extensions (pip builds them, as in README.md).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python -m venv /opt/socks6fast \
    && /opt/socks6fast/bin/pip install --no-cache-dir . \
    && /opt/socks6fast/bin/socks6fast --version

# Run stage: the same Python image (the venv's interpreter links point into it), no compiler.
FROM python:3.11-slim-bookworm
COPY --from=build /opt/socks6fast /opt/socks6fast
RUN useradd --system --no-create-home --shell /usr/sbin/nologin socks6fast
USER socks6fast
ENV PATH=/opt/socks6fast/bin:$PATH
EXPOSE 1080/tcp 1080/udp
# SIGTERM drains relayed connections for --drain-timeout (10 s); docker stop waits 10 s by
# default, so give it more (docker stop -t 15) or lower --drain-timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["socks6fast"]
CMD ["serve"]
