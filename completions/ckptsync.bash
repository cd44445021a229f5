# bash completion for ckptsync.
# Generated from the CLI by .ci/make-completions; do not edit by hand.
# Use: source this file from ~/.bashrc, or copy it to ~/.local/share/bash-completion/completions/ckptsync

_ckptsync_spec() {
    # $1: the command path; sets cmds, opts, dirs, files and values (options taking a value)
    cmds= opts= dirs= files= values=
    case "$1" in
        "")
            cmds="archive backup checklist compare cron demo list prune restore show verify"
            opts="--debug --help -h --json --log-file --quiet -q --version -V"
            files="--log-file"
            ;;
        "archive")
            opts="--config -c --debug --help -h --instance -i --json --local-dir -l --log-file --output -o --quiet -q --remove --wait"
            dirs="--local-dir -l"
            files="--config -c --log-file --output -o"
            values="--instance -i"
            ;;
        "backup")
            opts="--accept-new-host-key --all --checkpoint --compress --config -c --debug --discard-staged --dry-run -n --help -h --host -H --include-best --instance -i --json --local-dir -l --log-file --max-checkpoints -k --no-extra-files --quiet -q --remote-dir -r --skip-if-locked --wait"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--checkpoint --compress --host -H --instance -i --max-checkpoints -k"
            ;;
        "checklist")
            opts="--accept-new-host-key --backup --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i"
            ;;
        "compare")
            opts="--config -c --debug --help -h --instance -i --json --local-dir -l --log-file --quiet -q"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--instance -i"
            ;;
        "cron")
            cmds="install remove show"
            opts="--help -h"
            ;;
        "cron install")
            opts="--config -c --debug --every --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--every --host -H --instance -i"
            ;;
        "cron remove")
            opts="--config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i"
            ;;
        "cron show")
            opts="--config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i"
            ;;
        "demo")
            opts="--debug --dir --help -h --json --keep --log-file --quiet -q"
            dirs="--dir"
            files="--log-file"
            ;;
        "list")
            opts="--accept-new-host-key --config -c --debug --help -h --host -H --instance -i --json --local --local-dir -l --log-file --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i"
            ;;
        "prune")
            opts="--accept-new-host-key --config -c --debug --dry-run -n --force --help -h --host -H --instance -i --json --keep-best --keep-every --keep-last --keep-within --local-dir -l --log-file --no-keep-best --quiet -q --remote --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i --keep-every --keep-last --keep-within"
            ;;
        "restore")
            opts="--accept-new-host-key --adapter-only --checkpoint --compress --config -c --debug --discard-staged --dry-run -n --extra-files-only --extra-files-to --force --help -h --host -H --instance -i --json --local-dir -l --log-file --no-extra-files --quiet -q --remote-dir -r"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--checkpoint --compress --extra-files-to --host -H --instance -i"
            ;;
        "show")
            opts="--accept-new-host-key --ascii --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote --remote-dir -r --width"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i --width"
            ;;
        "verify")
            opts="--accept-new-host-key --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote --remote-dir -r --repair"
            dirs="--local-dir -l --remote-dir -r"
            files="--config -c --log-file"
            values="--host -H --instance -i"
            ;;
    esac
}

_ckptsync_choices() {
    case "$1|$2" in
    esac
}

_ckptsync() {
    local cur=${COMP_WORDS[COMP_CWORD]} path= pending= word i
    local cmds opts dirs files values
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ -n $pending ]]; then
            [[ $word == "=" ]] && continue  # --opt=value arrives as three words
            pending=
            continue
        fi
        [[ -z $word ]] && continue
        _ckptsync_spec "$path"
        if [[ " $dirs $files $values " == *" $word "* ]]; then
            pending=$word
        elif [[ $word != -* && " $cmds " == *" $word "* ]]; then
            path=${path:+$path }$word
        fi
    done
    [[ $cur == "=" ]] && cur=
    _ckptsync_spec "$path"
    COMPREPLY=()
    if [[ -n $pending ]]; then
        if [[ " $dirs " == *" $pending "* ]]; then
            compopt -o filenames 2>/dev/null
            local IFS=$'\n'  # names with spaces
            COMPREPLY=($(compgen -d -- "$cur"))
        elif [[ " $files " == *" $pending "* ]]; then
            compopt -o filenames 2>/dev/null
            local IFS=$'\n'  # names with spaces
            COMPREPLY=($(compgen -f -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_ckptsync_choices "$path" "$pending")" -- "$cur"))
        fi
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))
    fi
}

complete -F _ckptsync ckptsync
