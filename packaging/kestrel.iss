; Inno Setup 6 script: installs the PyInstaller folder (dist\Kestrel) per user or for all users,
; with a Start-menu shortcut and an optional desktop shortcut. build_windows.ps1 runs:
;   iscc /DAppVersion=0.1.0 /DDistDir=...\dist\Kestrel /O...\dist kestrel.iss

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef DistDir
  #define DistDir "dist\Kestrel"
#endif
#define AppName "Kestrel"
#define AppExe "Kestrel.exe"

[Setup]
; AppId identifies the app across upgrades: never change it.
AppId={{6B1E8F3A-2C4D-4E7B-9A51-5D0C7E2F9B84}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=Kestrel contributors
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
; Per-user install by default (no admin prompt); the user may choose all users.
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputBaseFilename={#AppName}-{#AppVersion}-setup
SetupIconFile=..\resources\icons\app\kestrel.ico
UninstallDisplayIcon={app}\{#AppExe}
; shown as the license page: what the bundle carries and under which licenses
LicenseFile=THIRD_PARTY_LICENSES.md
Compression=lzma2/ultra64
SolidCompression=yes
WizardStyle=modern

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Files]
Source: "{#DistDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
; Start menu
Name: "{group}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"
Name: "{group}\{cm:UninstallProgram,{#AppName}}"; Filename: "{uninstallexe}"
; Desktop (only when the user ticks the task above)
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#AppExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent
