# bash completion for ckptsync.
# Generated from the CLI by .ci/make-completions; do not edit by hand.
# Use: source this file from ~/.bashrc, or copy it to ~/.local/share/bash-completion/completions/ckptsync

_ckptsync_spec() {
    # $1: the command path; sets cmds, opts, dirs, files, ckpts (options taking a checkpoint name),
    # values (options taking a value) and cargs (what its arguments are: checkpoint, dir or nothing)
    cmds= opts= dirs= files= ckpts= values= cargs=
    case "$1" in
        "")
            cmds="adopt archive backup checklist compare cron demo doctor list prune restore show verify watch"
            opts="--config -c --debug --help -h --json --log-file --quiet -q --ssh --version -V"
            files="--config -c --log-file"
            values="--ssh"
            ;;
        "adopt")
            opts="--accept-new-host-key --config -c --debug --dry-run -n --extra-file --help -h --host -H --instance -i --json --log-file --quiet -q --remote-dir -r --ssh"
            files="--config -c --log-file"
            values="--extra-file --host -H --instance -i --remote-dir -r --ssh"
            cargs=dir
            ;;
        "archive")
            opts="--config -c --debug --help -h --instance -i --json --local-dir -l --log-file --output -o --quiet -q --remove --ssh --wait"
            dirs="--local-dir -l"
            files="--config -c --log-file --output -o"
            values="--instance -i --ssh"
            ;;
        "backup")
            opts="--accept-new-host-key --all --all-instances --bwlimit --checkpoint --compress --config -c --debug --discard-staged --dry-run -n --extra-file --follow-runs --help -h --host -H --include-best --instance -i --json --local-dir -l --log-file --max-checkpoints -k --no-extra-files --parallel --quiet -q --remote-dir -r --skip-if-locked --ssh --via-laptop --wait"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            ckpts="--checkpoint"
            values="--bwlimit --checkpoint --compress --extra-file --host -H --instance -i --max-checkpoints -k --parallel --remote-dir -r --ssh"
            ;;
        "checklist")
            opts="--accept-new-host-key --all-instances --backup --config -c --debug --extra-file --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r --ssh --training-stopped"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--extra-file --host -H --instance -i --remote-dir -r --ssh"
            ;;
        "compare")
            opts="--config -c --debug --help -h --instance -i --json --local-dir -l --log-file --quiet -q --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--instance -i --ssh"
            cargs=checkpoint
            ;;
        "cron")
            cmds="install remove show"
            opts="--help -h"
            ;;
        "cron install")
            opts="--all-instances --config -c --debug --every --help -h --host -H --instance -i --json --local-dir -l --log-file --notify --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--every --host -H --instance -i --remote-dir -r --ssh"
            ;;
        "cron remove")
            opts="--config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh"
            ;;
        "cron show")
            opts="--config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh"
            ;;
        "demo")
            opts="--config -c --debug --dir --help -h --json --keep --log-file --quiet -q --ssh"
            dirs="--dir"
            files="--config -c --log-file"
            values="--ssh"
            ;;
        "doctor")
            opts="--accept-new-host-key --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh"
            ;;
        "list")
            opts="--accept-new-host-key --all-instances --config -c --debug --generations --help -h --host -H --instance -i --json --local --local-dir -l --log-file --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh"
            ;;
        "prune")
            opts="--accept-new-host-key --config -c --debug --dry-run -n --force --help -h --host -H --instance -i --json --keep-best --keep-every --keep-generations --keep-last --keep-within --local-dir -l --log-file --no-keep-best --quiet -q --remote --remote-dir -r --ssh --wait"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --keep-every --keep-generations --keep-last --keep-within --remote-dir -r --ssh"
            ;;
        "restore")
            opts="--accept-new-host-key --adapter-only --all --bwlimit --checkpoint --compress --config -c --debug --discard-staged --dry-run -n --extra-file --extra-files-only --extra-files-to --force --generation --help -h --host -H --instance -i --json --local-dir -l --log-file --no-extra-files --parallel --quiet -q --remote-dir -r --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            ckpts="--checkpoint"
            values="--bwlimit --checkpoint --compress --extra-file --extra-files-to --generation --host -H --instance -i --parallel --remote-dir -r --ssh"
            ;;
        "show")
            opts="--accept-new-host-key --ascii --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --remote --remote-dir -r --ssh --width"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh --width"
            cargs=checkpoint
            ;;
        "verify")
            opts="--accept-new-host-key --config -c --debug --help -h --host -H --instance -i --json --local-dir -l --log-file --quiet -q --read-data --remote --remote-dir -r --repair --ssh"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--host -H --instance -i --remote-dir -r --ssh"
            cargs=checkpoint
            ;;
        "watch")
            opts="--accept-new-host-key --all-instances --bwlimit --compress --config -c --debug --help -h --hold-max --host -H --instance -i --interval --json --local-dir -l --log-file --max-checkpoints -k --no-hold --parallel --print-service --quiet -q --remote-dir -r --ssh --until-done"
            dirs="--local-dir -l"
            files="--config -c --log-file"
            values="--bwlimit --compress --hold-max --host -H --instance -i --interval --max-checkpoints -k --parallel --print-service --remote-dir -r --ssh"
            ;;
    esac
}

_ckptsync_choices() {
    case "$1|$2" in
    esac
}

_ckptsync_checkpoints() {
    # The checkpoint names in the backup directory; $@: the --config/--instance/--local-dir typed
    "${COMP_WORDS[0]}" __complete-checkpoints "$@" -- 2>/dev/null
}

_ckptsync() {
    local cur=${COMP_WORDS[COMP_CWORD]} path= pending= word i
    local cmds opts dirs files ckpts values cargs context=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ -n $pending ]]; then
            [[ $word == "=" ]] && continue  # --opt=value arrives as three words
            [[ " -c --config -i --instance -l --local-dir " == *" $pending "* ]] && context+=("$pending" "$word")
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
        elif [[ " $ckpts " == *" $pending "* ]]; then
            COMPREPLY=($(compgen -W "$(_ckptsync_checkpoints "${context[@]}")" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_ckptsync_choices "$path" "$pending")" -- "$cur"))
        fi
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ $cargs == checkpoint ]]; then
        COMPREPLY=($(compgen -W "$(_ckptsync_checkpoints "${context[@]}")" -- "$cur"))
    elif [[ $cargs == dir ]]; then
        compopt -o filenames 2>/dev/null
        local IFS=$'\n'  # names with spaces
        COMPREPLY=($(compgen -d -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))
    fi
}

complete -F _ckptsync ckptsync
