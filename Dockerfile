# Both images from one build: `docker build --target agent -t flotilla-agent .` and
# `--target hub -t flotilla-hub .`. Not built in our CI (its machines cannot build images);
# see deploy/README.md.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin flotilla-agent --bin flotilla-hub --bin flotilla

# The agent needs nothing but itself: it talks to its cluster through the API.
FROM gcr.io/distroless/cc-debian12:nonroot AS agent
COPY --from=build /src/target/release/flotilla-agent /usr/local/bin/flotilla-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla-agent"]

# The hub renders sources with kubectl (kustomize) and helm, which it runs as children.
FROM bitnami/kubectl:1.32 AS kubectl
FROM alpine/helm:3.16.3 AS helm
FROM gcr.io/distroless/cc-debian12:nonroot AS hub
COPY --from=build /src/target/release/flotilla-hub /usr/local/bin/flotilla-hub
COPY --from=build /src/target/release/flotilla /usr/local/bin/flotilla
COPY --from=kubectl /opt/bitnami/kubectl/bin/kubectl /usr/local/bin/kubectl
COPY --from=helm /usr/bin/helm /usr/local/bin/helm
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla-hub"]
