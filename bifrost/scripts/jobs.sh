# bifrost remote job helpers. Sent on stdin to `bash -s -- ARGS`; python appends the call line.
# Needs only bash + coreutils on the box: no daemon, no python.
__bf_root="$HOME/.bifrost/jobs"

__bf_boot() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }

# Start time of a pid (field 22 of /proc/PID/stat); empty when unknown.
__bf_pid_start() {
  local s rest
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${s##*) }
  # shellcheck disable=SC2086
  set -- $rest
  printf '%s' "${20}"
}

__bf_alive() {  # pid jobdir
  local pid=$1 d=$2 s rest
  [ -n "$pid" ] || return 1
  if [ -d /proc ] && [ -r /proc/self/stat ]; then
    s=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    rest=${s##*) }
    # shellcheck disable=SC2086
    set -- $rest
    [ "$1" != Z ] || return 1
    [ ! -s "$d/pid_start" ] || [ "$(cat "$d/pid_start")" = "${20}" ]
  else
    kill -0 "$pid" 2>/dev/null
  fi
}

# The detached wrapper: copied verbatim into the job dir as run.sh by __bf_launch.
__bf_wrapper() {
  local d="$1" rc=0 cwd v
  # A handled (not ignored) TERM: the child still dies by it, and we live to record its code.
  trap ':' TERM INT HUP
  export PATH="$HOME/.local/bin:$HOME/.cargo/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
  export PYTHONUNBUFFERED=1 BIFROST_JOB_DIR="$d" BIFROST_JOB_ID="${d##*/}"
  set -a
  # shellcheck disable=SC1091
  . "$d/env"
  set +a
  # It may hold secrets and nothing reads it again: do not leave them on the box's disk.
  rm -f "$d/env"
  if [ -s "$d/venv" ]; then
    v=$(cat "$d/venv")
    case "$v" in "~/"*) v="$HOME/${v#"~/"}" ;; esac
    if [ -d "$v/bin" ]; then export VIRTUAL_ENV="$v" UV_PROJECT_ENVIRONMENT="$v" PATH="$v/bin:$PATH"; fi
  fi
  cwd=$(cat "$d/cwd")
  case "$cwd" in "~") cwd=$HOME ;; "~/"*) cwd="$HOME/${cwd#"~/"}" ;; "") cwd=$HOME ;; esac
  if cd -- "$cwd"; then
    bash --norc --noprofile "$d/cmd"
    rc=$?
  else
    echo "bifrost: cannot cd to $cwd" >&2
    rc=126
  fi
  date -u +%Y-%m-%dT%H:%M:%SZ > "$d/ended_at"
  printf '%s\n' "$rc" > "$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"
}

__bf_launch() {  # payload (lines "key base64", then "sum SHA256 LENGTH") on stdin
  local k v id="" d pid all="" sum="" have um
  local -A P=()
  while IFS=' ' read -r k v; do
    if [ "$k" = sum ]; then sum=$v; break; fi
    [ -n "$k" ] || continue
    P[$k]="$v"
    all+="$k $v"$'\n'
  done
  # A cut connection truncates the heredoc and bash runs what arrived: check that the whole
  # request is here before anything is written or started.
  if command -v sha256sum > /dev/null 2>&1; then
    have="$(printf '%s' "$all" | sha256sum | cut -d' ' -f1) ${#all}"
  else
    have="${sum%% *} ${#all}"
  fi
  if [ -z "$sum" ] || [ "$have" != "$sum" ]; then
    echo "bifrost: the launch request arrived incomplete (connection cut?): nothing was started" >&2
    return 6
  fi
  # Job dirs hold commands, env and logs: private to the user (the job itself gets the
  # user's own umask back below, so the files it writes are as usual).
  um=$(umask)
  umask 077
  id=$(printf '%s' "${P[id]:-}" | base64 -d)
  case "$id" in ''|.*|*[!A-Za-z0-9._-]*) echo "bifrost: invalid job id" >&2; return 2 ;; esac
  d="$__bf_root/$id"
  mkdir -p "$__bf_root" && chmod 700 "$__bf_root" && mkdir -- "$d" || { echo "bifrost: job $id already exists" >&2; return 3; }
  printf '%s' "${P[cmd]:-}" | base64 -d > "$d/cmd"
  printf '%s' "${P[meta]:-}" | base64 -d > "$d/meta.json"
  printf '%s' "${P[cwd]:-}" | base64 -d > "$d/cwd"
  printf '%s' "${P[venv]:-}" | base64 -d > "$d/venv"
  printf '%s' "${P[env]:-}" | base64 -d > "$d/env"
  __bf_boot > "$d/boot_id"
  { declare -f __bf_wrapper; echo '__bf_wrapper "$@"'; } > "$d/run.sh"
  : > "$d/log"
  date -u +%Y-%m-%dT%H:%M:%SZ > "$d/started_at"
  umask "$um"
  # All three fds redirected, or sshd keeps the channel open until the job ends.
  setsid bash --norc --noprofile "$d/run.sh" "$d" < /dev/null >> "$d/log" 2>&1 &
  pid=$!
  __bf_pid_start "$pid" > "$d/pid_start"
  printf '%s\n' "$pid" > "$d/pid.tmp" && mv -f "$d/pid.tmp" "$d/pid"
  # A tmux session that shows the job's output, for `bifrost attach` or a plain
  # `tmux -L bifrost attach`. The job itself never runs inside tmux: its stdin stays /dev/null,
  # it gets no terminal, and a dead tmux server cannot take it down.
  if __bf_has_tmux; then
    __bf_write_view "$d"
    if tmux -L bifrost new-session -d -s "$(__bf_session "$id")" -c "$d" "$__bf_view_cmd" \
        < /dev/null > /dev/null 2>&1; then
      echo tmux > "$d/tmux"
    fi
  fi
  printf 'BIFROST_STARTED %s %s\n' "$id" "$pid"
}

__bf_has_tmux() { tmux -V > /dev/null 2>&1; }

# tmux turns '.' and ':' in session names into '_'; say so up front so lookups match.
__bf_session() { local id=$1; printf 'bifrost-%s' "${id//[.:]/_}"; }

# The pane's command, run from the job dir (tmux -c): the tmux server may have been started
# with another environment, so nothing in it may depend on $HOME or on quoting of paths.
__bf_view_cmd='bash --norc --noprofile ./view.sh'

__bf_write_view() { { declare -f __bf_view; echo '__bf_view'; } > "$1/view.sh"; }

# The pane of a job's tmux session: the whole log, live, until the job ends.
__bf_view() {
  local d=$PWD pid rc
  pid=$(cat "$d/pid" 2>/dev/null)
  printf '[bifrost] job %s: live log; detach with your tmux prefix + d (the job keeps running)\n' "${d##*/}"
  tail -n +1 -F -s 0.2 --pid="$pid" "$d/log" 2> /dev/null
  rc=$(cat "$d/exit_code" 2> /dev/null)
  printf '[bifrost] job %s ended (exit code %s)\n' "${d##*/}" "${rc:-unknown}"
  # Keep the last screen for whoever is watching; a session nobody watches just goes away.
  if [ "$(tmux display-message -p '#{session_attached}' 2> /dev/null || echo 0)" != 0 ]; then
    read -r -s -n 1 -t 3600 -p '[bifrost] press a key to close' || true
  fi
}

# `bifrost attach` preparation: does the job exist, is tmux usable, is the view script there?
__bf_attach_prep() {  # id
  local d="$__bf_root/$1"
  [ -d "$d" ] || { echo missing; return 3; }
  if ! __bf_has_tmux; then echo notmux; return 0; fi
  [ -f "$d/view.sh" ] || __bf_write_view "$d"
  printf 'tmux %s\n' "$(__bf_session "$1")"
}

# A job's state from its dir alone: cancelled, finished, lost (another boot), running (the
# wrapper alive with its recorded start time: a reused pid does not count), or died.
__bf_state() {  # jobdir
  local d=$1
  if [ -f "$d/cancelled" ]; then echo cancelled
  elif [ -f "$d/exit_code" ]; then echo finished
  elif [ "$(cat "$d/boot_id" 2>/dev/null)" != "$(__bf_boot)" ]; then echo lost
  elif __bf_alive "$(cat "$d/pid" 2>/dev/null)" "$d"; then echo running
  elif [ -f "$d/exit_code" ]; then echo finished  # it just ended
  else echo died
  fi
}

__bf_status_one() {
  local id=$1 d="$__bf_root/$1" state rc="" pid=""
  if [ ! -d "$d" ]; then printf '%s\tmissing\n' "$id"; return; fi
  pid=$(cat "$d/pid" 2>/dev/null)
  state=$(__bf_state "$d")
  [ -f "$d/exit_code" ] && rc=$(cat "$d/exit_code")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$state" "$rc" "$pid" \
    "$(cat "$d/started_at" 2>/dev/null)" "$(cat "$d/ended_at" 2>/dev/null)" \
    "$(base64 -w0 < "$d/meta.json" 2>/dev/null)"
}

# Stream the log from byte OFFSET (0-based). With FOLLOW=1, keep streaming while the job runs
# by the same test as status (boot id, pid start time): `tail --pid` alone trusts `kill -0`,
# which a reused pid, a reboot, or root (any pid counts) keeps true forever.
__bf_follow() {  # id offset follow
  local d="$__bf_root/$1" n=$2 sz tp
  [ -d "$d" ] || return 3
  sz=$(stat -c %s "$d/log" 2>/dev/null || echo 0)
  if [ "$sz" -lt "$n" ]; then echo BIFROST_RESET >&2; return 4; fi
  if [ "$3" = 1 ] && [ "$(__bf_state "$d")" = running ]; then
    tail -c +$((n + 1)) -F -s 0.2 "$d/log" 2>/dev/null &
    tp=$!
    while [ "$(__bf_state "$d")" = running ]; do sleep 0.3; done
    kill "$tp" 2>/dev/null
    wait "$tp" 2>/dev/null
    return 0
  fi
  exec tail -c +$((n + 1)) "$d/log"
}

__bf_status() {  # job ids, or none for all
  local id
  if [ $# -eq 0 ]; then
    [ -d "$__bf_root" ] || return 0
    for id in $(ls -1tr "$__bf_root"); do __bf_status_one "$id"; done
  else
    for id in "$@"; do __bf_status_one "$id"; done
  fi
}

__bf_kill() {  # id grace_tenths
  local d="$__bf_root/$1" pid i=0
  [ -d "$d" ] || { echo missing; return 3; }
  if [ -f "$d/exit_code" ]; then echo finished; return 0; fi
  # Marker first: killing the group may take the wrapper down before it records anything.
  date -u +%Y-%m-%dT%H:%M:%SZ > "$d/cancelled"
  pid=$(cat "$d/pid" 2>/dev/null)
  if [ -n "$pid" ]; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    while [ "$i" -lt "$2" ] && kill -0 -- "-$pid" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
    kill -KILL -- "-$pid" 2>/dev/null
  fi
  if [ ! -f "$d/exit_code" ]; then
    date -u +%Y-%m-%dT%H:%M:%SZ > "$d/ended_at"
    echo 137 > "$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"
  fi
  echo cancelled
}
