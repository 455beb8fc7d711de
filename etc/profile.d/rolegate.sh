# rolegate: point the AWS CLI and SDKs at this login's role credentials.
# Logins through PAM (ssh, sudo -i, console) already carry the variables; shells that never
# went through PAM (su -l, AWS SSM Session Manager) ask the broker for the user's own grant.
# POSIX sh; silent unless something is wrong. Installed by `rolegate install`.
__rolegate_bin=@ROLEGATE@
__rolegate_dir=@RUNTIME_DIR@/
__rolegate_have=
case "${AWS_SHARED_CREDENTIALS_FILE:-}" in
    "$__rolegate_dir"*) [ -r "$AWS_SHARED_CREDENTIALS_FILE" ] && __rolegate_have=1 ;;
esac
case "${AWS_CONFIG_FILE:-}" in
    "$__rolegate_dir"*) [ -r "$AWS_CONFIG_FILE" ] && __rolegate_have=1 ;;
esac
case "${AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE:-}" in
    "$__rolegate_dir"*) [ -r "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" ] && __rolegate_have=1 ;;
esac
if [ -n "$__rolegate_have" ]; then
    # Static keys inherited from elsewhere would shadow the grant (SDKs read them first).
    unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_SECURITY_TOKEN
elif [ -x "$__rolegate_bin" ]; then
    __rolegate_out=$("$__rolegate_bin" env --shell sh) && eval "$__rolegate_out"
fi
# rolegate's region is a default: when the user's own AWS config names a region for the profile in
# use, drop ours, so theirs wins (SDKs read these variables before any config file).
__rolegate_cfg=${AWS_CONFIG_FILE:-${HOME:-/nonexistent}/.aws/config}
case "$__rolegate_cfg" in "$__rolegate_dir"*) __rolegate_cfg= ;; esac
if [ -n "$__rolegate_have$__rolegate_out" ] && [ -n "$__rolegate_cfg" ] && [ -f "$__rolegate_cfg" ] \
    && [ -r "$__rolegate_cfg" ] && awk -v p="${AWS_PROFILE:-${AWS_DEFAULT_PROFILE:-default}}" '
        /^[ \t]*\[/ { s = $0; gsub(/^[ \t]*\[[ \t]*|[ \t]*\][ \t]*$/, "", s)
                      inside = (s == "profile " p || s == p); next }
        inside && /^[ \t]*region[ \t]*=[ \t]*[^ \t]/ { found = 1 }
        END { exit !found }' "$__rolegate_cfg" 2>/dev/null; then
    unset AWS_REGION AWS_DEFAULT_REGION
fi
unset __rolegate_bin __rolegate_dir __rolegate_have __rolegate_out __rolegate_cfg
