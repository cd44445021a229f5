# fish completion for ckptsync.
# Generated from the CLI by .ci/make-completions; do not edit by hand.
# Use: copy it to ~/.config/fish/completions/ckptsync.fish

function __ckptsync_path --description 'The ckptsync subcommands typed so far'
    set -l words (commandline -opc)
    set -e words[1]
    set -l path
    set -l pending 0
    for word in $words
        if test $pending = 1
            set pending 0
            continue
        end
        set -l cmds
        set -l values
        switch "$path"
            case ''
                set cmds archive backup checklist compare cron demo list prune restore show verify
            case 'archive'
                set values --config -c --instance -i --local-dir -l --output -o
            case 'backup'
                set values --checkpoint --compress --config -c --host -H --instance -i --local-dir -l --log-file --max-checkpoints -k --remote-dir -r
            case 'checklist'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r
            case 'compare'
                set values --config -c --instance -i --local-dir -l
            case 'cron'
                set cmds install remove show
            case 'cron install'
                set values --config -c --every --host -H --instance -i --local-dir -l --log-file --remote-dir -r
            case 'cron remove'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r
            case 'cron show'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r
            case 'demo'
                set values --dir
            case 'list'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r
            case 'prune'
                set values --config -c --host -H --instance -i --keep-every --keep-last --keep-within --local-dir -l --remote-dir -r
            case 'restore'
                set values --checkpoint --compress --config -c --host -H --instance -i --local-dir -l --remote-dir -r
            case 'show'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r --width
            case 'verify'
                set values --config -c --host -H --instance -i --local-dir -l --remote-dir -r
        end
        if contains -- $word $values
            set pending 1
        else if contains -- $word $cmds
            set path (string join " " $path $word)
        end
    end
    echo "$path"
end

function __ckptsync_at --description 'True when the subcommands typed so far are $argv[1]'
    set -l path (__ckptsync_path)
    test "$path" = "$argv[1]"
end

complete -c ckptsync -f
complete -c ckptsync -n '__ckptsync_at \'\'' -a archive -d 'Pack a finished run\'s backup directory into one .tar.zst and verify it by rea...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a backup -d 'Fetch complete checkpoints from the server, verified, into the backup directory'
complete -c ckptsync -n '__ckptsync_at \'\'' -a checklist -d 'May I delete this instance now?'
complete -c ckptsync -n '__ckptsync_at \'\'' -a compare -d 'Compare two backed-up checkpoints: step, epoch, loss and learning-rate change...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a cron -d 'Run `ckptsync backup` from your crontab: one entry per target, installed, sho...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a demo -d 'Build a sample training run in a temp directory and run list, backup, verify...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a list -d 'List checkpoints on the server and in the backup directory, newest first'
complete -c ckptsync -n '__ckptsync_at \'\'' -a prune -d 'Delete the checkpoints no --keep rule keeps, in the backup directory or (--re...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a restore -d 'Put a backed-up checkpoint on a (new) server, ready to resume training'
complete -c ckptsync -n '__ckptsync_at \'\'' -a show -d 'Details of one checkpoint: step, losses, best, files, resumability, backup ti...'
complete -c ckptsync -n '__ckptsync_at \'\'' -a verify -d 'Check backups: re-read every file and compare size and xxh3-128 with the mani...'
complete -c ckptsync -n '__ckptsync_at \'\'' -l debug -d 'Show tracebacks (also CKPTSYNC_DEBUG=1)'
complete -c ckptsync -n '__ckptsync_at \'\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'\'' -l version -s V -d 'Print the version and exit'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l output -s o -r -F -d 'Archive file (default: <backup-dir>-<YYYYmmdd>.tar.zst next to the backup dir...'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l quiet -s q -d 'Only warnings and errors'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l remove -d 'After the archive is read back and verified, remove the archived checkpoints...'
complete -c ckptsync -n '__ckptsync_at \'archive\'' -l wait -d 'Wait for another run on the same backup directory instead of exiting 11'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l all -d 'Every complete checkpoint'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l checkpoint -x -d 'Back up this checkpoint (repeatable)'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l compress -x -d 'auto (measure and decide), off, or a zstd level 1-19'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l dry-run -s n -d 'Show what would happen; change nothing'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l include-best -d 'Also the best checkpoint (trainer_state.json), when older'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l log-file -r -F -d 'Append log lines to this file'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l max-checkpoints -s k -x -d 'How many of the newest complete checkpoints'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l no-extra-files -d 'Skip the configured extra_files'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l quiet -s q -d 'Only warnings and errors'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l skip-if-locked -d 'When another run holds the lock, log one line and exit 0 (for cron)'
complete -c ckptsync -n '__ckptsync_at \'backup\'' -l wait -d 'Wait for another run on the same backup directory instead of exiting 11'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l backup -d 'Run the missing backup first, then check'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'checklist\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'compare\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'compare\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'compare\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'compare\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'compare\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'cron\'' -a install -d 'Add the crontab entry that backs up this target, or replace it when there is one'
complete -c ckptsync -n '__ckptsync_at \'cron\'' -a remove -d 'Remove this target\'s crontab entry; other lines are left as they are'
complete -c ckptsync -n '__ckptsync_at \'cron\'' -a show -d 'The crontab entry of this target, how its last run went, and the end of its log'
complete -c ckptsync -n '__ckptsync_at \'cron\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l every -x -d 'How often, e.g. 15m, 30m, 1h, 2h, 1d or 1w: a divisor of an hour or of a day'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l log-file -r -F -d 'Log of the cron runs (default: <backup dir>/.ckptsync/cron.log)'
complete -c ckptsync -n '__ckptsync_at \'cron install\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'cron remove\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'cron show\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'demo\'' -l dir -x -a '(__fish_complete_directories (commandline -ct))' -d 'Where to build the demo (default: a new temp directory)'
complete -c ckptsync -n '__ckptsync_at \'demo\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'demo\'' -l keep -d 'Keep the demo files afterwards'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l local -d 'Only the backup directory; no connection'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'list\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l dry-run -s n -d 'Show what would happen; change nothing'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l force -d 'Allow replacing or deleting what is otherwise protected'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l keep-best -d 'Keep the best checkpoint(s) (trainer_state.json, best_model.pt)'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l keep-every -x -d 'Keep the first checkpoint at or after every multiple of STEPS'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l keep-last -x -d 'Keep the K newest complete checkpoints'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l keep-within -x -d 'Keep checkpoints written within DURATION (e.g. 12h, 7d, 2w)'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l remote -d 'Prune the server\'s checkpoints instead of the backups'
complete -c ckptsync -n '__ckptsync_at \'prune\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l adapter-only -d 'Send only the adapter/model weights and their configs: to fine-tune from, not...'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l checkpoint -x -d 'Restore this checkpoint (default: the newest resumable backup)'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l compress -x -d 'auto (measure and decide), off, or a zstd level 1-19'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l dry-run -s n -d 'Show what would happen; change nothing'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l force -d 'Allow replacing or deleting what is otherwise protected'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l no-extra-files -d 'Do not put the backed-up extra files back'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l quiet -s q -d 'Only warnings and errors'
complete -c ckptsync -n '__ckptsync_at \'restore\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l ascii -d 'Draw with ASCII characters only'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l remote -d 'Read the checkpoint on the server instead of the backup (implied by --host/--...'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
complete -c ckptsync -n '__ckptsync_at \'show\'' -l width -x -d 'Chart width (default: the terminal\'s, 72 in a pipe)'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l accept-new-host-key -d 'Trust and remember the host key of a server seen for the first time'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l config -s c -r -F -d 'Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/c...'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l help -s h -d 'Show this message and exit'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l host -s H -x -d '[user@]host[:port] or an ~/.ssh/config alias'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l instance -s i -x -d 'Instance number: from the config, else the SSH alias tnr-N (what `tnr connect...'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l json -d 'Print the result as JSON, for scripts'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l local-dir -s l -x -a '(__fish_complete_directories (commandline -ct))' -d 'Backup directory (default: <local_dir>/instance-N)'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l quiet -s q -d 'Only warnings and errors'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l remote -d 'Compare the server\'s copy with the backup (hashed on the server) instead of r...'
complete -c ckptsync -n '__ckptsync_at \'verify\'' -l remote-dir -s r -x -a '(__fish_complete_directories (commandline -ct))' -d 'Checkpoint directory on the server'
