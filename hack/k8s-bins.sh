#!/usr/bin/env bash
# Build the real Kubernetes control-plane binaries used by tests/e2e, from Go modules only
# (no Docker, no release downloads): kube-apiserver, kube-controller-manager, kubectl
# (k8s.io/kubernetes), etcd (go.etcd.io/etcd/server/v3), helm (helm.sh/helm/v3) and kwok.
#
# Versions come from the wrapper modules in tests/k8s/*/go.mod. Binaries are cached outside
# the repository, keyed by the Kubernetes version:
#   ${DATASYNC_K8S_CACHE:-$HOME/.cache/datasync/k8s}/<k8s-version>/bin/
# Only missing (or outdated, see the .stamp files) binaries are rebuilt. The last line on
# stdout is the bin directory; everything else goes to stderr and to <version>/logs/.
#
# Environment:
#   DATASYNC_K8S_CACHE        cache root (default ~/.cache/datasync/k8s)
#   DATASYNC_K8S_BUILD_JOBS   `go build -p` (default 1: the machine is shared, 2 cores)
#   DATASYNC_K8S_ONLY         space-separated subset of: kube etcd helm kwok (default all)
#   GOMODCACHE, GOCACHE       honoured if set and outside the repo (else Go's defaults,
#                             or folders under the cache root if those are inside the repo)
set -euo pipefail

log() { echo "k8s-bins: $*" >&2; }
die() { echo "k8s-bins: ERROR: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
WRAP="$REPO/tests/k8s"
JOBS=${DATASYNC_K8S_BUILD_JOBS:-1}
ONLY=${DATASYNC_K8S_ONLY:-kube etcd helm kwok}

command -v go >/dev/null 2>&1 || die "'go' not found in PATH; Go >= 1.26 is needed to build the control plane"
for d in kube etcd helm kwok; do
    [ -f "$WRAP/$d/go.mod" ] || die "missing wrapper module $WRAP/$d/go.mod"
done

# Version of module $2 required by go.mod $1 (single-line or block require; comments ignored).
modver() {
    awk -v m="$2" '$1 ~ /^\/\// {next} {for (i = 1; i < NF; i++) if ($i == m) {print $(i + 1); exit}}' "$1"
}
K8S_VERSION=$(modver "$WRAP/kube/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(modver "$WRAP/etcd/go.mod" go.etcd.io/etcd/server/v3)
HELM_VERSION=$(modver "$WRAP/helm/go.mod" helm.sh/helm/v3)
KWOK_VERSION=$(modver "$WRAP/kwok/go.mod" sigs.k8s.io/kwok)
[[ "$K8S_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "cannot read a k8s.io/kubernetes release version from $WRAP/kube/go.mod (got '$K8S_VERSION')"
K8S_MINOR=${BASH_REMATCH[1]}
STAGING_VERSION="v0.${K8S_VERSION#v1.}"   # v1.37.2 -> v0.37.2
[ -n "$ETCD_VERSION" ] && [ -n "$HELM_VERSION" ] && [ -n "$KWOK_VERSION" ] \
    || die "cannot read etcd/helm/kwok versions from $WRAP/*/go.mod"

# Keep every cache outside the repository.
inside_repo() {
    local p
    p=$(realpath -m "$1")
    [[ "$p" == "$REPO" || "$p" == "$REPO"/* ]]
}
CACHE_ROOT=${DATASYNC_K8S_CACHE:-$HOME/.cache/datasync/k8s}
inside_repo "$CACHE_ROOT" && die "DATASYNC_K8S_CACHE ($CACHE_ROOT) must be outside the repository $REPO"
VDIR="$CACHE_ROOT/$K8S_VERSION"
BIN="$VDIR/bin"
mkdir -p "$BIN" "$VDIR/src" "$VDIR/logs" || die "cannot create $VDIR"

GOMODCACHE=${GOMODCACHE:-$(go env GOMODCACHE)}
GOCACHE=${GOCACHE:-$(go env GOCACHE)}
inside_repo "$GOMODCACHE" && GOMODCACHE="$CACHE_ROOT/go/mod"
inside_repo "$GOCACHE" && GOCACHE="$CACHE_ROOT/go/build"
export GOMODCACHE GOCACHE
export GOTOOLCHAIN=local CGO_ENABLED=0 GO111MODULE=on GOWORK=off
export GOFLAGS="-buildvcs=false"

GO_VERSION=$(go env GOVERSION)
[[ "$GO_VERSION" =~ ^go1\.([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge 26 ] \
    || die "Go >= 1.26 is needed (k8s.io/kubernetes $K8S_VERSION says go 1.26), found $GO_VERSION"

# One builder per version folder at a time (e.g. several pytest sessions starting at once).
exec 9>"$VDIR/.lock"
flock 9

# Low priority: the machine is shared and small.
NICE=(nice -n 19)
command -v ionice >/dev/null 2>&1 && NICE+=(ionice -c 3)

TIMES="$VDIR/build-times.log"
record_time() { # name seconds
    printf '%s %-5s %4ds  go=%s jobs=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" "$GO_VERSION" "$JOBS" >>"$TIMES"
    log "$1: built in $2 s"
}

# Stamp = what a binary was built from; a binary is rebuilt when missing or its stamp differs.
# Bump FLAGS_REV when build flags below change, so cached binaries are rebuilt.
FLAGS_REV=1
stamp_for() { # component module-version
    { echo "$1 $2 $GO_VERSION rev$FLAGS_REV"; cat "$WRAP/$1"/go.mod "$WRAP/$1"/*.go 2>/dev/null || true; } | sha256sum | cut -c1-16
}
missing() { # component stamp bin...  -> prints binaries that need a build
    local comp=$1 st=$2 b
    shift 2
    for b in "$@"; do
        if [ ! -x "$BIN/$b" ] || [ "$(cat "$BIN/.$b.stamp" 2>/dev/null)" != "$st" ]; then
            echo "$b"
        fi
    done
}

# Copy a wrapper module to a scratch folder outside the repo: the repo copy is never edited.
prepare_src() { # component -> prints the folder
    local src="$VDIR/src/$1"
    rm -rf "$src"
    mkdir -p "$src"
    cp "$WRAP/$1"/go.mod "$src/"
    cp "$WRAP/$1"/*.go "$src/" 2>/dev/null || true
    echo "$src"
}

# go build into a temp folder, then move the binaries in place with their stamps.
build() { # component stamp ldflags pkg...
    local comp=$1 st=$2 ldflags=$3 src="$VDIR/src/$1" tmp pkg b
    shift 3
    tmp=$(mktemp -d "$VDIR/tmp.$comp.XXXXXX")
    log "$comp: go build -p $JOBS $* (log: $VDIR/logs/$comp.log)"
    if ! (cd "$src" && "${NICE[@]}" go build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$tmp/" "$@") \
        >>"$VDIR/logs/$comp.log" 2>&1; then
        tail -n 30 "$VDIR/logs/$comp.log" >&2
        rm -rf "$tmp"
        die "$comp: go build failed (full log: $VDIR/logs/$comp.log)"
    fi
    for pkg in "$@"; do
        b=${pkg##*/}
        [ "$pkg" = . ] && b=$comp   # main package at the module root (named after the module)
        [ -x "$tmp/$b" ] || die "$comp: go build produced no $b"
        mv -f "$tmp/$b" "$BIN/$b"
        echo "$st" >"$BIN/.$b.stamp"
    done
    rm -rf "$tmp"
}

tidy() { # component
    (cd "$VDIR/src/$1" && "${NICE[@]}" go mod tidy) >>"$VDIR/logs/$1.log" 2>&1 \
        || { tail -n 30 "$VDIR/logs/$1.log" >&2; die "$1: go mod tidy failed (full log: $VDIR/logs/$1.log)"; }
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

# --- kube-apiserver, kube-controller-manager, kubectl ----------------------------------------
build_kube() {
    local st todo pkgs=() b gomod staging n=0 args=() date p ldflags="-s -w"
    st=$(stamp_for kube "$K8S_VERSION")
    todo=$(missing kube "$st" kube-apiserver kube-controller-manager kubectl)
    [ -z "$todo" ] && return 0
    local t0=$SECONDS
    prepare_src kube >/dev/null
    log "kube: k8s.io/kubernetes $K8S_VERSION, deriving staging replaces from its go.mod"
    # The go.mod of k8s.io/kubernetes names every staging module it replaces with ./staging/src.
    gomod=$(cd "$VDIR" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>>"$VDIR/logs/kube.log" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p') || true
    [ -n "$gomod" ] && [ -f "$gomod" ] \
        || die "kube: cannot download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy (see $VDIR/logs/kube.log)"
    staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$gomod")
    [ -n "$staging" ] || die "kube: no ./staging/src replace lines found in $gomod"
    for p in $staging; do
        args+=("-replace=$p=$p@$STAGING_VERSION")
        n=$((n + 1))
    done
    (cd "$VDIR/src/kube" && go mod edit "${args[@]}") || die "kube: go mod edit -replace failed"
    log "kube: replaced $n staging modules with their published $STAGING_VERSION"
    tidy kube
    # buildDate: the release's publication time on the proxy, so rebuilds give the same output.
    date=$(cd "$VDIR" && go list -m -json "k8s.io/kubernetes@$K8S_VERSION" 2>/dev/null \
        | sed -n 's/^[[:space:]]*"Time": "\(.*\)",\{0,1\}$/\1/p')
    date=${date:-1970-01-01T00:00:00Z}
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR"
        ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    for b in $todo; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    build kube "$st" "$ldflags" "${pkgs[@]}"
    record_time "kube" $((SECONDS - t0))
}

# --- etcd ----------------------------------------------------------------------------------------
build_etcd() {
    local st todo
    st=$(stamp_for etcd "$ETCD_VERSION")
    todo=$(missing etcd "$st" etcd)
    [ -z "$todo" ] && return 0
    local t0=$SECONDS
    prepare_src etcd >/dev/null
    log "etcd: go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    tidy etcd
    build etcd "$st" "-s -w" .
    record_time "etcd" $((SECONDS - t0))
}

# --- helm ------------------------------------------------------------------------------------------
build_helm() {
    local st todo cg maj min ldflags
    st=$(stamp_for helm "$HELM_VERSION")
    todo=$(missing helm "$st" helm)
    [ -z "$todo" ] && return 0
    local t0=$SECONDS
    prepare_src helm >/dev/null
    log "helm: helm.sh/helm/v3 $HELM_VERSION"
    tidy helm
    # Same ldflags as helm's Makefile (version, and the Kubernetes version of its client-go).
    cg=$(cd "$VDIR/src/helm" && go list -m -f '{{.Version}}' k8s.io/client-go) || die "helm: go list k8s.io/client-go failed"
    cg=${cg#v}
    maj=$((${cg%%.*} + 1))
    min=$(echo "$cg" | cut -d. -f2)
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$min"
    ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$min"
    build helm "$st" "$ldflags" helm.sh/helm/v3/cmd/helm
    record_time "helm" $((SECONDS - t0))
}

# --- kwok ------------------------------------------------------------------------------------------
build_kwok() {
    local st todo
    st=$(stamp_for kwok "$KWOK_VERSION")
    todo=$(missing kwok "$st" kwok)
    [ -z "$todo" ] && return 0
    local t0=$SECONDS
    prepare_src kwok >/dev/null
    log "kwok: sigs.k8s.io/kwok $KWOK_VERSION"
    tidy kwok
    build kwok "$st" "-s -w" sigs.k8s.io/kwok/cmd/kwok
    record_time "kwok" $((SECONDS - t0))
}

T0=$SECONDS
for c in $ONLY; do
    case $c in
        kube | etcd | helm | kwok) "build_$c" ;;
        *) die "unknown component '$c' in DATASYNC_K8S_ONLY (kube etcd helm kwok)" ;;
    esac
done
rm -rf "$VDIR"/tmp.* 2>/dev/null || true

# Sanity check: every wanted binary is there and runs.
want kube && { for b in kube-apiserver kube-controller-manager kubectl; do [ -x "$BIN/$b" ] || die "$b missing in $BIN"; done; }
want etcd && { "$BIN/etcd" --version >/dev/null 2>&1 || die "$BIN/etcd does not run"; }
want helm && { [ -x "$BIN/helm" ] || die "helm missing in $BIN"; }
want kwok && { [ -x "$BIN/kwok" ] || die "kwok missing in $BIN"; }
cat >"$VDIR/versions.txt" <<EOF
kubernetes $K8S_VERSION (staging $STAGING_VERSION)
etcd $ETCD_VERSION
helm $HELM_VERSION
kwok $KWOK_VERSION
go $GO_VERSION
EOF
[ $((SECONDS - T0)) -gt 1 ] && log "done in $((SECONDS - T0)) s; build times: $TIMES"
echo "$BIN"
