from shared.service import main
from services.tftp.service import TftpService

main(TftpService)
