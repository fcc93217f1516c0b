#!/usr/bin/env bash
# Installs a Vulkan driver when none is present, so wgpu finds an adapter on a machine without a GPU.
# On Debian 12 it takes Mesa (lavapipe) from bookworm-backports, whose compute path is about 4x faster
# than bookworm's. The backports suite is added with the mirror the machine's apt sources already use.
set -euo pipefail

have_vulkan_driver() {
    compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null || compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null
}

if have_vulkan_driver; then
    echo "install-vulkan: a Vulkan driver is already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-vulkan: no Vulkan driver found; install Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Reuse the first Debian mirror already configured (deb822 or one-line format).
    mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
    if [ -z "$mirror" ]; then
        mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    fi
    if [ -n "$mirror" ]; then
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" >/etc/apt/sources.list.d/dorac-backports.sources
    fi
fi
apt-get update -qq
# grep reads the whole listing (no -q): under pipefail an early exit of grep -q fails the pipeline
# with SIGPIPE, and the slow Mesa of the main suite would be installed instead.
if [ "$codename" = bookworm ] && apt-cache policy mesa-vulkan-drivers | grep bpo >/dev/null; then
    apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
    apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
have_vulkan_driver && echo "install-vulkan: installed $(dpkg-query -W -f='${Package} ${Version}' mesa-vulkan-drivers)"
