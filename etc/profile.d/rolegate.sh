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
# 0.3.0's process delivery pointed AWS_CONFIG_FILE at rolegate's own file: sessions begun before
# an upgrade keep it until they end.
case "${AWS_CONFIG_FILE:-}" in
    "$__rolegate_dir"*) [ -r "$AWS_CONFIG_FILE" ] && __rolegate_have=1 ;;
esac
case "${AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE:-}" in
    "$__rolegate_dir"*) [ -r "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" ] && __rolegate_have=1 ;;
esac
if [ -n "$__rolegate_have" ]; then
    # Static keys inherited from elsewhere would shadow the grant (SDKs read them first).
    unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_SECURITY_TOKEN
    # Whose region wins: the broker decided at login, for profile `default` in ~/.aws/config. A
    # shell that selects another profile (botocore's order) or config file asks `rolegate region`,
    # which decides with the same rule, and so does one whose config is reached through a link
    # (a dotfile manager's), which the broker, as root, does not follow; `rolegate region` reads
    # as the user. The usual shell starts no program here.
    case "${AWS_CONFIG_FILE:-}" in
        "$__rolegate_dir"*) ;; # 0.3.0's process delivery file: the user's config is not in use
        *) if [ -n "${AWS_CONFIG_FILE:-}" ] || [ "${AWS_DEFAULT_PROFILE:-${AWS_PROFILE:-default}}" != default ] \
               || [ -L "${HOME:-/nonexistent}/.aws" ] || [ -L "${HOME:-/nonexistent}/.aws/config" ]; then
               [ -x "$__rolegate_bin" ] && __rolegate_out=$("$__rolegate_bin" region --shell sh) \
                   && eval "$__rolegate_out"
           fi ;;
    esac
elif [ -x "$__rolegate_bin" ]; then
    # A shell without PAM's variables (su -l, SSM): `rolegate env` also decides whose region wins.
    __rolegate_out=$("$__rolegate_bin" env --shell sh) && eval "$__rolegate_out"
fi
unset __rolegate_bin __rolegate_dir __rolegate_have __rolegate_out
