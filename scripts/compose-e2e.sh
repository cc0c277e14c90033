#!/usr/bin/env bash
# End-to-end check of the CPU compose stack on a real Docker engine (opt-in; not in the suite).
#
#   scripts/compose-e2e.sh                     # uses the engine DOCKER_HOST / the default socket points at
#   scripts/compose-e2e.sh --start-engine      # starts its own dockerd (root), stops it at the end
#   STANDIN=1 scripts/compose-e2e.sh           # air-gapped: Debian stand-in bases + host-built wheels
#   E2E_LEARNER_PROCS=2 scripts/compose-e2e.sh # the same with a 2-rank torchrun learner
#   E2E_MULTI_TEACHER=1 scripts/compose-e2e.sh # two teacher pools (deploy/docker-compose.multi-teacher*.yml)
#
# Brings up redis, learner, teacher, rollout and Prometheus (and Grafana when its image is
# there) from docker-compose.yml + deploy/docker-compose.cpu.yml under project $E2E_PROJECT,
# then checks, printing a summary table at the end (exit 1 if any check failed):
#   healthy      every container's healthcheck reports healthy
#   up-again     a second `up -d` with nothing changed recreates no container
#   training     the learner's weight version increases
#   scale        `--scale rollout=3` mid-run: 3 replicas, each a Prometheus target, each producing
#   crash        kill -9 of the learner's process in its container: restarted by the restart
#                policy, resumed from its checkpoint, training again
#   exactly-once after stopping producers and learner: `opd audit` (services/audit.py) balances
#                produced = trained once + dropped + abandoned + queued, none trained twice
#   password     Redis refuses a client without the password and one with a wrong one
#   dashboard    every panel query of the Grafana dashboard returns data from the real
#                Prometheus (plus Grafana's health and the provisioned dashboard, if it runs)
#   down         `down -v` leaves no container, volume or network of the project
#   pools        (E2E_MULTI_TEACHER=1) the addition and list pools each have a live replica and
#                the learner trains trajectories of both
#
# Images. STANDIN=auto (default) builds stand-ins when python:3.11-slim can be neither found
# nor pulled: scripts/standin-images.sh (Debian python3 3.11, redis-server 7.0, prometheus
# 2.x; no Grafana: the dashboard is then checked against Prometheus alone) and
# scripts/wheelhouse.sh (the image installs from deploy/wheels/, no network). STANDIN=0
# uses the registry images; STANDIN=1 forces stand-ins. Needs curl and python3 on the host.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${E2E_PROJECT:-opde2e}
STANDIN=${STANDIN:-auto}
BATCH=16
WORK=${E2E_WORK:-/tmp/opd-compose-e2e}
PROM=http://127.0.0.1:9090
START_ENGINE=0
MULTI_FILES=()
if [ "${E2E_MULTI_TEACHER:-0}" = 1 ]; then
  MULTI_FILES=(-f deploy/docker-compose.multi-teacher.yml -f deploy/docker-compose.multi-teacher.cpu.yml)
fi
[ "${1:-}" = "--start-engine" ] && START_ENGINE=1
declare -a RESULTS=()
FAILED=0

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
record() {  # record NAME PASS|FAIL DETAIL
  RESULTS+=("$(printf '%-13s %-5s %s' "$1" "$2" "$3")")
  [ "$2" = PASS ] || FAILED=1
  log "$1: $2 $3"
}
compose() { docker compose -p "$PROJECT" -f docker-compose.yml -f deploy/docker-compose.cpu.yml "${MULTI_FILES[@]}" "$@"; }
promql() {  # promql EXPR -> the first sample's value ("" if none)
  curl -fsS --get "$PROM/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "timed out: $what"; return 1; }
    sleep 2
  done
}

start_engine() {
  mkdir -p "$WORK"
  dockerd --iptables=false --storage-driver=overlay2 -H "unix://$WORK/docker.sock" --data-root "$WORK/data" \
    --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" >"$WORK/dockerd.log" 2>&1 &
  ENGINE_PID=$!
  export DOCKER_HOST="unix://$WORK/docker.sock"
  wait_for 60 "dockerd to start" docker info || { tail -20 "$WORK/dockerd.log" >&2; exit 1; }
  log "started dockerd (pid $ENGINE_PID, $DOCKER_HOST)"
}

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then compose down -v --remove-orphans >/dev/null 2>&1 || true; fi
  if [ -n "${ENGINE_PID:-}" ]; then kill "$ENGINE_PID" 2>/dev/null && wait "$ENGINE_PID" 2>/dev/null || true; fi
}

use_standins() {
  log "building stand-in base images and the wheelhouse (no registry)"
  scripts/standin-images.sh
  scripts/wheelhouse.sh   # every time: adds what changed dependencies need (pip caches the rest)
  export OPD_PYTHON_IMAGE=opd-standin/python:3.11 OPD_REDIS_IMAGE=opd-standin/redis:7 \
         OPD_PROMETHEUS_IMAGE=opd-standin/prometheus:2 OPD_OFFLINE_WHEELS=1
}

pick_images() {
  local registry=1
  if [ "$STANDIN" = auto ]; then
    docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull -q python:3.11-slim >/dev/null 2>&1 || registry=0
  fi
  { [ "$STANDIN" = 1 ] || [ $registry = 0 ]; } && use_standins
  SERVICES=(redis learner teacher rollout prometheus)
  if [ ${#MULTI_FILES[@]} -gt 0 ]; then SERVICES+=(teacher-list); fi
  local grafana=${OPD_GRAFANA_IMAGE:-grafana/grafana:11.4.0}
  if docker image inspect "$grafana" >/dev/null 2>&1 || { [ "$STANDIN" != 1 ] && docker pull -q "$grafana" >/dev/null 2>&1; }; then
    SERVICES+=(grafana)
  else
    log "no Grafana image ($grafana): the dashboard is checked against Prometheus only"
  fi
}

bring_up() {
  export REDIS_PASSWORD=${REDIS_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
  export OPD_RUN=e2e OPD_LEARNER_MAX_STEPS=0 OPD_LEARNER_BATCH_SIZE=$BATCH
  export OPD_LEARNER_EVAL_EVERY=50 OPD_LEARNER_EVAL_PROBLEMS=50   # the dashboard's held-out panels
  export OPD_LEARNER_PROCS=${E2E_LEARNER_PROCS:-1}   # >1: the torchrun learner (gloo ranks on CPU)
  local t0=$SECONDS
  compose build >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; exit 1; }
  BUILD_S=$((SECONDS - t0)); t0=$SECONDS
  compose up -d --wait --wait-timeout 600 "${SERVICES[@]}"
  UP_S=$((SECONDS - t0))
  log "built in ${BUILD_S}s, up and healthy in ${UP_S}s"
}

check_healthy() {
  local bad
  bad=$(for c in $(compose ps -q "${SERVICES[@]}"); do
          docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}' "$c"
        done | grep -v -e ' healthy$' -e 'prometheus.* no-healthcheck$' -e 'grafana.* no-healthcheck$' || true)
  [ -z "$bad" ] && record healthy PASS "$(compose ps -q | wc -l) containers (build ${BUILD_S}s, up ${UP_S}s)" \
                || record healthy FAIL "$bad"
}

learner_version() { promql 'max(opd_weight_version{service="learner"})'; }
version_above() { local v; v=$(learner_version); [ -n "$v" ] && [ "${v%.*}" -gt "$1" ]; }

check_up_again() {  # a second `up` with nothing changed recreates nothing (one image, one build)
  local before after out
  before=$(compose ps -q | sort)
  out=$(compose up -d "${SERVICES[@]}" 2>&1)
  after=$(compose ps -q | sort)
  [ "$before" = "$after" ] && ! grep -q Recreate <<<"$out" && record up-again PASS "no container recreated" \
    || record up-again FAIL "$(grep -c Recreate <<<"$out") recreated"
}

check_training() {
  wait_for 120 "a learner version in Prometheus" version_above -1 || true
  local v0 v1; v0=$(learner_version); v0=${v0%.*}
  if wait_for 120 "the learner version to increase" version_above "${v0:-0}"; then
    v1=$(learner_version); record training PASS "version ${v0} -> ${v1%.*}"
  else record training FAIL "version stuck at ${v0:-none}"; fi
}

rollout_targets_up() { [ "$(promql 'count(up{job="rollout"} == 1)')" = 3 ]; }
rollouts_producing() {  # every rollout replica has handed off work since it started
  [ "$(promql 'count(sum by (replica) (opd_items_total{service="rollout"}) > 0)')" = 3 ]
}

check_scale() {
  compose up -d --wait --wait-timeout 300 --no-recreate --scale rollout=3 rollout
  local running; running=$(compose ps -q rollout | wc -l)
  if [ "$running" = 3 ] && wait_for 90 "3 rollout targets" rollout_targets_up \
      && wait_for 120 "work on every replica" rollouts_producing; then
    record scale PASS "3 rollout replicas, 3 targets up, each produced items"
  else record scale FAIL "$running running, targets up: $(promql 'count(up{job="rollout"} == 1)')"; fi
}

learner_container() { compose ps -q learner; }
restarts() { docker inspect -f '{{.RestartCount}}' "$(learner_container)"; }
restarted_since() { [ "$(restarts)" -gt "$1" ]; }
learner_healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(learner_container)")" = healthy ]; }
resumed() { compose logs learner 2>/dev/null | grep "resumed from" >/dev/null; }  # not -q: SIGPIPE + pipefail

check_crash() {
  wait_for 120 "a checkpoint past version 10" version_above 12 || true
  local before pid v
  before=$(restarts)
  # the learner's own process by its host PID: opd-learner, or with N ranks the last rank
  # (torchrun then stops the others and exits non-zero)
  pid=$(docker top "$(learner_container)" -eo pid,args |
        awk '(/opd-learner/ || /-m services.learner/) && !/docker-init/ && !/torch.distributed.run/ {p=$1} END {print p}')
  v=$(learner_version)
  kill -9 "$pid"
  log "killed the learner (host pid $pid) at version ${v%.*}"
  if wait_for 120 "a restart" restarted_since "$before" && wait_for 300 "a healthy learner" learner_healthy \
      && wait_for 60 "the resume log line" resumed && wait_for 180 "training after the restart" version_above "${v%.*}"; then
    record crash PASS "restarts $before -> $(restarts); $(compose logs learner | grep -o 'resumed from .*' | tail -1)"
  else record crash FAIL "restarts $(restarts), health $(docker inspect -f '{{.State.Health.Status}}' "$(learner_container)")"; fi
}

check_exactly_once() {
  compose stop rollout >/dev/null 2>&1
  if [ ${#MULTI_FILES[@]} -gt 0 ]; then compose stop teacher teacher-list >/dev/null 2>&1; else compose stop teacher >/dev/null 2>&1; fi
  compose stop learner >/dev/null 2>&1
  local out rc=0
  out=$(compose run --rm --no-deps -T learner opd audit --checkpoint-dir /outputs/e2e/checkpoints \
          --batch-size "$BATCH" --json 2>/dev/null) || rc=$?
  local detail
  detail=$(echo "$out" | tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print(
    "produced {trajectories_produced} = trained {trained} + dropped {dropped_stale_or_foreign} + abandoned "
    "{abandoned_by_rollback} + queued {still_queued} (version {checkpoint_version} x batch); invalid "
    "{invalid_dead_letters}".format(**r), *r["problems"], sep="; ")' 2>&1) || detail="audit failed: $out"
  [ $rc = 0 ] && record exactly-once PASS "$detail" || record exactly-once FAIL "$detail"
}

check_password() {
  local none wrong right
  none=$(compose exec -T redis sh -c 'REDISCLI_AUTH= redis-cli ping' 2>&1 || true)
  wrong=$(compose exec -T redis sh -c 'REDISCLI_AUTH=wrong redis-cli ping' 2>&1 || true)
  right=$(compose exec -T redis redis-cli ping 2>&1 || true)
  if [[ "$none" == *NOAUTH* ]] && [[ "$wrong" == *WRONGPASS* || "$wrong" == *invalid* ]] && [ "$right" = PONG ]; then
    record password PASS "no password: NOAUTH; wrong password: refused; the right one: PONG"
  else record password FAIL "none='$none' wrong='$wrong' right='$right'"; fi
}

check_dashboard() {
  local missing
  missing=$(python3 - "$PROM" <<'PY'
import json, sys, urllib.parse, urllib.request
prom = sys.argv[1]
for panel in json.load(open("deploy/grafana/dashboards/opd.json"))["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "15m")
        if "DCGM_" in expr:  # the GPU row: compose --profile gpu-metrics, GPU hosts only
            continue
        url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        if not json.load(urllib.request.urlopen(url, timeout=10))["data"]["result"]:
            print(f"{panel['title']}: {expr}")
PY
)
  local panels; panels=$(python3 -c 'import json; print(sum(len(p.get("targets", [])) for p in json.load(open("deploy/grafana/dashboards/opd.json"))["panels"]))')
  local grafana="not run (no image)"
  if [[ " ${SERVICES[*]} " == *" grafana "* ]]; then
    curl -fsS http://127.0.0.1:3000/api/health >/dev/null && curl -fsS http://127.0.0.1:3000/api/dashboards/uid/opd-overview >/dev/null \
      && grafana="healthy, dashboard provisioned" || { grafana="dashboard not served"; missing+=" grafana"; }
  fi
  [ -z "$missing" ] && record dashboard PASS "$panels queries return data; Grafana: $grafana" \
                    || record dashboard FAIL "no data: $missing"
}

pool_trained() { local v; v=$(promql "max(opd_teacher_trained_trajectories_total{teacher_id=\"$1\"})"); [ -n "$v" ] && [ "${v%.*}" -gt 0 ]; }
pool_live() { [ "$(promql "max(opd_teacher_replicas{teacher_id=\"$1\"})")" = 1 ]; }

check_pools() {  # E2E_MULTI_TEACHER=1: both pools up, both pools' trajectories trained
  local p detail=""
  for p in addition list; do
    if wait_for 180 "pool $p to be live and trained" pool_live "$p" && wait_for 180 "pool $p trained" pool_trained "$p"; then
      detail+="$p: 1 replica, $(promql "max(opd_teacher_trained_trajectories_total{teacher_id=\"$p\"})" | cut -d. -f1) trained; "
    else record pools FAIL "pool $p: replicas $(promql "max(opd_teacher_replicas{teacher_id=\"$p\"})"), trained none"; return; fi
  done
  record pools PASS "$detail"
}

check_down() {
  compose down -v --remove-orphans >/dev/null 2>&1
  local left
  left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
  left+="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
  left+="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
  [ -z "$left" ] && record down PASS "no container, volume or network left" || record down FAIL "left: $left"
}

main() {
  mkdir -p "$WORK"
  trap cleanup EXIT
  if [ $START_ENGINE = 1 ] || ! docker info >/dev/null 2>&1; then start_engine; fi
  docker compose version >/dev/null || { log "needs Docker Compose v2 (docker compose)"; exit 1; }
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  pick_images
  bring_up
  check_healthy
  check_up_again
  check_training
  if [ ${#MULTI_FILES[@]} -gt 0 ]; then check_pools; fi
  check_scale
  check_dashboard       # while every service runs and has history
  check_crash
  check_password
  check_exactly_once
  check_down
  printf '\n%-13s %-5s %s\n' CHECK RESULT DETAIL
  printf '%s\n' "${RESULTS[@]}"
  exit $FAILED
}

main "$@"
