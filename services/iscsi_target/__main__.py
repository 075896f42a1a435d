from services.iscsi_target.service import IscsiTargetService
from shared.service import main

main(IscsiTargetService)
