"""Operations tools run from a checkout of the repository, not part of the runtime wheel:
`backup` (PostgreSQL and Redis backups, retention, verification and restore; see
BACKUP_RESTORE.md and scripts/backup, scripts/restore, scripts/verify-backup)."""
