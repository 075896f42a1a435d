from shared.service import main
from services.dhcp.service import DhcpService

main(DhcpService)
