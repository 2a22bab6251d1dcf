# One image for every fz role: docker run IMAGE portal serve | relay run | gateway up | client up
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY firezone ./firezone
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# What the roles call at run time: ip (netlink is in-process, but operators want it), nft for the
# gateway's masquerade, and CA certificates for https portals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The portal keeps its database here; mount a volume.
VOLUME ["/var/lib/firezone"]
ENV FIREZONE_PORTAL_DATA_DIR=/var/lib/firezone/portal
# Portal HTTP, relay STUN/TURN, client/gateway WireGuard.
EXPOSE 8080/tcp 3478/udp 52625/udp
ENTRYPOINT ["fz"]
CMD ["--help"]
